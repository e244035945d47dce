//! Lane scheduling: how one fetch response's byte budget is shared between lanes.
//!
//! A fetch names many lane logs: every lane of many partitions, maybe of several
//! topics. Each (topic, lane) is a *lane* here, with a weight and the lane logs it reads.
//! The scheduler decides how many bytes of whole batches each lane log contributes:
//!
//! - `weighted` (the default): deficit round robin by bytes. Every round, each lane with
//!   data earns `QUANTUM_BYTES × weight` of credit and takes whole batches, round robin
//!   over its lane logs, while its credit covers the next one. Under backlog the lanes
//!   share the budget by weight (16:4:1: express gets 16/21); an empty lane's share goes
//!   to the others (work-conserving); credit that a lane with data could not spend yet is
//!   carried to the next response, so no lane starves, however large its batches.
//! - `strict`: a lane is served only once every more urgent lane of its topic has
//!   nothing left. A more urgent lane that the client's per-lane budget has stopped does
//!   not hold the others back.
//!
//! A connection's responses are one round robin cut into pieces: when the next batch
//! would overflow a response, the response ends and the next resumes with that lane's
//! turn, so the cut favours no lane. Only a response's first batch may overflow it, and
//! each cap may be exceeded by one batch: a batch larger than any budget is still sent,
//! and a response is at most its budget plus one batch.
//!
//! This module knows nothing of storage or networking: it gets batch sizes, returns
//! byte counts.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How a topic's lanes share fetch responses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LanePolicy {
    /// All of a more urgent lane first.
    Strict,
    /// Deficit round robin by bytes with the lane weights.
    #[default]
    Weighted,
}

impl FromStr for LanePolicy {
    type Err = String;
    fn from_str(text: &str) -> Result<LanePolicy, String> {
        match text {
            "strict" => Ok(LanePolicy::Strict),
            "weighted" => Ok(LanePolicy::Weighted),
            _ => Err("expected strict or weighted".into()),
        }
    }
}

impl fmt::Display for LanePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LanePolicy::Strict => "strict",
            LanePolicy::Weighted => "weighted",
        })
    }
}

/// Largest lane weight.
pub const WEIGHT_MAX: u32 = 1 << 20;

/// Credit a lane earns per round and unit of weight.
const QUANTUM_BYTES: u64 = 1024;

/// The default weights of `lanes` lanes: each lane 4 times the next (16:4:1 for three).
pub fn default_weights(lanes: usize) -> Vec<u32> {
    (0..lanes)
        .map(|lane| 4u32.saturating_pow((lanes - 1 - lane) as u32).min(WEIGHT_MAX))
        .collect()
}

/// One lane of one fetch: its weight and what its lane logs offer.
#[derive(Clone, Debug, Default)]
pub struct LaneDemand {
    pub weight: u32,
    /// Strict policy: the lane (index into the fetch's lanes) that must have nothing left
    /// before this one is served. `None` for the most urgent lane, and under `weighted`.
    pub after: Option<usize>,
    /// Per lane log, the sizes of the whole batches it could return, in order.
    pub logs: Vec<Vec<u32>>,
    /// Some lane log has data beyond what it offered (it was read up to a cap): the lane
    /// is not empty even once its offers are used up, so under `strict` it still holds
    /// the lanes after it back, and it keeps its credit.
    pub more: bool,
    /// The cap (index into [`plan`]'s `caps`) this lane's bytes count against, shared
    /// with other lanes of the same number in other topics; `None` for no cap.
    pub cap: Option<usize>,
}

/// Per lane of a fetch: credit carried between responses, in bytes. Kept by the caller
/// (per connection) and handed to [`plan`] each time.
pub type Deficits = [u64];

#[derive(Debug)]
struct LaneState {
    /// Per log: batches taken.
    next: Vec<usize>,
    /// Per log: bytes taken.
    bytes: Vec<usize>,
    /// The log that gives the next batch (round robin).
    cursor: usize,
    taken: usize,
    /// Has data, but its next batch does not fit its cap.
    stopped_by_cap: bool,
}

impl LaneState {
    /// The next batch's log and size, starting at the cursor.
    fn next_batch(&self, demand: &LaneDemand) -> Option<(usize, u32)> {
        let logs = demand.logs.len();
        (0..logs)
            .map(|i| (self.cursor + i) % logs)
            .find_map(|log| demand.logs[log].get(self.next[log]).map(|size| (log, *size)))
    }

    fn has_data(&self, demand: &LaneDemand) -> bool {
        demand.more || self.next_batch(demand).is_some()
    }
}

/// Shares `budget` bytes between `lanes`, each lane within its cap in `caps` (soft: one
/// batch over is allowed). `deficits` (one per lane) and `resume` (the lane whose turn
/// the last response ended in) are the connection's carried state, read and updated;
/// `rotation` picks which lane log of each lane goes first (pass a counter, so no
/// partition is always last). Returns, per lane and per lane log, the bytes of whole
/// batches to send: a prefix of what it offered.
///
/// The responses of a connection are one deficit round robin cut into pieces: when the
/// next batch would overflow the budget, the response ends there and the next one
/// resumes with that lane's turn. Only a response's first batch may overflow it (so a
/// batch larger than any budget is still sent), which bounds a response at
/// `budget + one batch`.
pub fn plan(
    lanes: &[LaneDemand],
    caps: &[usize],
    deficits: &mut Deficits,
    resume: &mut Option<usize>,
    budget: usize,
    rotation: usize,
) -> Vec<Vec<usize>> {
    assert_eq!(lanes.len(), deficits.len(), "one deficit per lane");
    let mut cap_taken = vec![0usize; caps.len()];
    let mut states: Vec<LaneState> = lanes
        .iter()
        .map(|demand| LaneState {
            next: vec![0; demand.logs.len()],
            bytes: vec![0; demand.logs.len()],
            cursor: if demand.logs.is_empty() {
                0
            } else {
                rotation % demand.logs.len()
            },
            taken: 0,
            stopped_by_cap: false,
        })
        .collect();
    let per_round = |lane: usize| QUANTUM_BYTES * u64::from(lanes[lane].weight);
    let mut total = 0usize;
    // The interrupted round of the last response goes on with this lane's turn; it was
    // credited for it already.
    let mut resuming = resume.take().filter(|&lane| lane < lanes.len());
    'rounds: loop {
        // Lanes served this round: with batches offered, not held back by the client's
        // cap, and (strict) not behind a more urgent lane that still has data.
        let serving: Vec<usize> = (0..lanes.len())
            .filter(|&lane| {
                let state = &states[lane];
                state.next_batch(&lanes[lane]).is_some() && !state.stopped_by_cap && lanes[lane].weight > 0
            })
            .filter(|&lane| {
                let mut before = lanes[lane].after;
                while let Some(b) = before {
                    if states[b].has_data(&lanes[b]) && !states[b].stopped_by_cap {
                        return false;
                    }
                    before = lanes[b].after;
                }
                true
            })
            .collect();
        if serving.is_empty() {
            break;
        }
        let continuing = resuming.take();
        let mut progressed = false;
        let mut capped = false;
        // A resumed round skips the lanes that had their turn before the cut.
        for lane in serving
            .iter()
            .copied()
            .filter(|&l| continuing.is_none_or(|c| l >= c))
        {
            let demand = &lanes[lane];
            let state = &mut states[lane];
            if continuing != Some(lane) {
                deficits[lane] = deficits[lane].saturating_add(per_round(lane));
            }
            while let Some((log, size)) = state.next_batch(demand) {
                let size_bytes = size as usize;
                if deficits[lane] < u64::from(size) {
                    break;
                }
                if total > 0 && total + size_bytes > budget {
                    // Full: the next response goes on from here.
                    *resume = Some(lane);
                    break 'rounds;
                }
                if let Some(cap) = demand.cap
                    && cap_taken[cap] > 0
                    && cap_taken[cap] + size_bytes > caps[cap]
                {
                    state.stopped_by_cap = true;
                    capped = true;
                    break;
                }
                if let Some(cap) = demand.cap {
                    cap_taken[cap] += size_bytes;
                }
                state.next[log] += 1;
                state.bytes[log] += size_bytes;
                state.cursor = (log + 1) % demand.logs.len();
                state.taken += size_bytes;
                total += size_bytes;
                deficits[lane] -= u64::from(size);
                progressed = true;
            }
        }
        if progressed || capped || continuing.is_some() {
            continue;
        }
        // Nobody could take a batch this round: skip ahead to the first round in which
        // some lane's credit covers its next batch.
        let rounds = serving
            .iter()
            .filter_map(|&lane| {
                let (_, size) = states[lane].next_batch(&lanes[lane])?;
                Some(
                    u64::from(size)
                        .saturating_sub(deficits[lane])
                        .div_ceil(per_round(lane)),
                )
            })
            .min()
            .unwrap_or(1);
        // The next loop adds one round itself.
        for &lane in &serving {
            deficits[lane] =
                deficits[lane].saturating_add(per_round(lane).saturating_mul(rounds.saturating_sub(1)));
        }
    }
    for (lane, state) in states.iter().enumerate() {
        deficits[lane] = match state.next_batch(&lanes[lane]) {
            // Credit is for waiting work only (as in any deficit round robin).
            None if !lanes[lane].more => 0,
            // It has more than it offered: a round's credit at most, so a lane read up to
            // a cap never saves up a burst.
            None => deficits[lane].min(per_round(lane)),
            // Enough to send the next batch, never a burst saved up while the client's
            // budget held the lane back.
            Some((_, size)) if state.stopped_by_cap => {
                deficits[lane].min(per_round(lane).max(u64::from(size)))
            }
            Some(_) => deficits[lane],
        };
    }
    states.into_iter().map(|state| state.bytes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lane whose `logs` lane logs each offer `batches` batches of `size` bytes.
    fn lane(weight: u32, logs: usize, batches: usize, size: u32) -> LaneDemand {
        LaneDemand {
            weight,
            after: None,
            logs: vec![vec![size; batches]; logs],
            more: false,
            cap: None,
        }
    }

    fn lane_totals(plan: &[Vec<usize>]) -> Vec<usize> {
        plan.iter().map(|logs| logs.iter().sum()).collect()
    }

    #[test]
    fn default_weights_are_powers_of_four() {
        assert_eq!(default_weights(3), vec![16, 4, 1]);
        assert_eq!(default_weights(1), vec![1]);
        assert_eq!(default_weights(8)[0], 16384);
    }

    /// A simple deterministic generator for batch sizes.
    fn sizes(seed: &mut u64, count: usize) -> Vec<u32> {
        (0..count)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                1024 + (*seed >> 33) as u32 % (63 * 1024)
            })
            .collect()
    }

    #[test]
    fn under_backlog_each_lane_gets_its_weighted_share() {
        for weights in [vec![16, 4, 1], vec![1, 1], vec![8, 3, 2, 1], vec![100, 1]] {
            let mut seed = 7;
            let mut deficits = vec![0; weights.len()];
            let mut resume = None;
            let mut served = vec![0usize; weights.len()];
            for round in 0..2000 {
                let lanes: Vec<LaneDemand> = weights
                    .iter()
                    .map(|&weight| LaneDemand {
                        weight,
                        after: None,
                        logs: (0..4).map(|_| sizes(&mut seed, 64)).collect(),
                        more: true,
                        cap: None,
                    })
                    .collect();
                let plan = plan(&lanes, &[], &mut deficits, &mut resume, 1 << 20, round);
                for (lane, bytes) in lane_totals(&plan).into_iter().enumerate() {
                    served[lane] += bytes;
                }
            }
            assert!(
                deficits.iter().all(|d| *d <= 4 << 20),
                "credit stays bounded: {deficits:?}"
            );
            let total: usize = served.iter().sum();
            let weight_sum: u32 = weights.iter().sum();
            for (lane, weight) in weights.iter().enumerate() {
                let share = served[lane] as f64 / total as f64;
                let target = f64::from(*weight) / f64::from(weight_sum);
                assert!(
                    (share - target).abs() <= 0.05 * target,
                    "weights {weights:?}: lane {lane} got {share:.4}, its weight says {target:.4}"
                );
            }
        }
    }

    #[test]
    fn strict_never_serves_a_lower_lane_while_a_higher_one_has_data() {
        let mut lanes = vec![lane(1, 2, 10, 1000), lane(1, 2, 10, 1000), lane(1, 1, 10, 1000)];
        lanes[1].after = Some(0);
        lanes[2].after = Some(1);
        let mut deficits = vec![0; 3];
        // Budget for part of lane 0: nothing else.
        let plan_small = plan(&lanes, &[], &mut deficits, &mut None, 15_000, 0);
        assert_eq!(lane_totals(&plan_small), vec![15_000, 0, 0]);
        // Budget for all of lane 0 and some of lane 1: lane 2 gets nothing.
        let mut deficits = vec![0; 3];
        let plan_mid = plan(&lanes, &[], &mut deficits, &mut None, 25_000, 0);
        assert_eq!(lane_totals(&plan_mid), vec![20_000, 5_000, 0]);
        // A lane that offered less than it has (read up to a cap) holds the next back
        // even once its offer is used up.
        let mut short = lanes.clone();
        short[0].more = true;
        let mut deficits = vec![0; 3];
        assert_eq!(
            lane_totals(&plan(&short, &[], &mut deficits, &mut None, 25_000, 0)),
            vec![20_000, 0, 0]
        );
        assert!(deficits[0] > 0, "and keeps its credit");
        // A lane capped by the client's budget does not hold the next one back.
        lanes[0].cap = Some(0);
        let mut deficits = vec![0; 3];
        let plan_capped = plan(&lanes, &[3_000], &mut deficits, &mut None, 10_000, 0);
        assert_eq!(lane_totals(&plan_capped), vec![3_000, 7_000, 0]);
    }

    #[test]
    fn work_conserving_when_upper_lanes_are_empty() {
        let lanes = vec![lane(16, 3, 0, 1000), lane(4, 3, 0, 1000), lane(1, 3, 100, 1000)];
        let mut deficits = vec![0; 3];
        let plan = plan(&lanes, &[], &mut deficits, &mut None, 50_000, 0);
        assert_eq!(lane_totals(&plan), vec![0, 0, 50_000]);
        // Round robin across the lane's lane logs.
        assert!(
            plan[2].iter().all(|bytes| (16_000..=17_000).contains(bytes)),
            "{plan:?}"
        );
    }

    #[test]
    fn no_lane_starves_even_with_batches_as_large_as_the_budget() {
        // Express saturated with small batches; bulk's every batch fills a response.
        let lanes = vec![
            lane(16, 1, 10_000, 1000),
            lane(4, 1, 10_000, 1000),
            lane(1, 1, 100, 100_000),
        ];
        let mut deficits = vec![0; 3];
        let mut resume = None;
        let mut bulk_batches = 0;
        for round in 0..200 {
            bulk_batches += plan(&lanes, &[], &mut deficits, &mut resume, 100_000, round)[2][0] / 100_000;
        }
        // Its share is 1/21 of the bytes: about 200 × 100 000 / 21 / 100 000 ≈ 9 batches.
        assert!(bulk_batches >= 5, "bulk got {bulk_batches} batches");
    }

    #[test]
    fn a_batch_larger_than_the_budget_is_sent_alone() {
        // Lane 1's small batches go first; the big one would overflow the response, so
        // the next response resumes with it, as its first batch.
        let lanes = vec![lane(16, 1, 3, 5_000_000), lane(1, 1, 3, 100)];
        let mut deficits = vec![0; 2];
        let mut resume = None;
        assert_eq!(
            lane_totals(&plan(&lanes, &[], &mut deficits, &mut resume, 1_000_000, 0)),
            vec![0, 300]
        );
        assert_eq!(resume, Some(0));
        let lanes = vec![lane(16, 1, 3, 5_000_000), lane(1, 1, 0, 100)];
        assert_eq!(
            lane_totals(&plan(&lanes, &[], &mut deficits, &mut resume, 1_000_000, 1)),
            vec![5_000_000, 0],
            "at most one batch over the budget"
        );
        // Two lanes (of two topics) share one cap: one batch over it, in all.
        let capped = vec![
            LaneDemand {
                cap: Some(0),
                ..lane(1, 1, 3, 100)
            },
            LaneDemand {
                cap: Some(0),
                ..lane(1, 1, 3, 100)
            },
        ];
        let mut deficits = vec![0; 2];
        assert_eq!(
            lane_totals(&plan(&capped, &[10], &mut deficits, &mut None, 1_000_000, 0)),
            vec![100, 0]
        );
    }

    #[test]
    fn lanes_read_up_to_a_cap_never_save_up_credit() {
        // Every lane offers less than the budget (its lane logs were read up to a cap)
        // and has more: each response takes all offers, and no credit piles up.
        let lanes: Vec<LaneDemand> = [16, 4, 1]
            .into_iter()
            .map(|weight| LaneDemand {
                more: true,
                ..lane(weight, 1, 4, 64 * 1024)
            })
            .collect();
        let mut deficits = vec![0; 3];
        let mut resume = None;
        for round in 0..1000 {
            let plan = plan(&lanes, &[], &mut deficits, &mut resume, 8 << 20, round);
            assert_eq!(lane_totals(&plan), vec![256 * 1024; 3]);
            assert!(
                deficits
                    .iter()
                    .zip([16, 4, 1])
                    .all(|(d, w)| *d <= QUANTUM_BYTES * w),
                "{deficits:?}"
            );
        }
    }

    #[test]
    fn empty_requests_and_zero_weights_end() {
        let mut deficits = vec![];
        assert!(plan(&[], &[], &mut deficits, &mut None, 1000, 0).is_empty());
        let lanes = vec![lane(0, 1, 5, 10), LaneDemand::default()];
        let mut deficits = vec![0; 2];
        assert_eq!(
            lane_totals(&plan(&lanes, &[], &mut deficits, &mut None, 1000, 3)),
            vec![0, 0]
        );
    }
}
