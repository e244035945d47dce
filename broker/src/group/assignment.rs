//! Which member of a group owns which partition: balanced, and sticky.
//!
//! 1. A partition stays with its previous owner if that member is still in the group and
//!    still subscribed to the topic.
//! 2. Partitions without an owner go, one by one, to the eligible member with the fewest
//!    partitions (ties: the smallest member id).
//! 3. While the most loaded member has two more partitions than the least loaded, one
//!    partition moves between them (the highest one the lighter member may take).
//!
//! With every member subscribed to the same topics, counts differ by at most one, and a
//! membership change moves only the partitions that must move: those of a member that
//! left, or the surplus that makes room for a member that joined.

use std::collections::{BTreeMap, BTreeSet};

use lanes_protocol::PartitionId;

/// One partition of one topic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: PartitionId,
}

/// Computes the target assignment. `members` maps member ids to subscribed topics,
/// `partitions` is every partition of those topics, `previous` the last assignment.
pub fn assign(
    members: &BTreeMap<String, BTreeSet<String>>,
    partitions: &BTreeSet<TopicPartition>,
    previous: &BTreeMap<TopicPartition, String>,
) -> BTreeMap<TopicPartition, String> {
    let eligible = |member: &str, p: &TopicPartition| {
        members
            .get(member)
            .is_some_and(|topics| topics.contains(&p.topic))
    };
    let mut owned: BTreeMap<&str, BTreeSet<&TopicPartition>> =
        members.keys().map(|m| (m.as_str(), BTreeSet::new())).collect();
    let mut unowned = Vec::new();
    for p in partitions {
        match previous.get(p).filter(|m| eligible(m, p)) {
            Some(member) => {
                owned.get_mut(member.as_str()).expect("a member").insert(p);
            }
            None => unowned.push(p),
        }
    }
    for p in unowned {
        let lightest = owned
            .iter()
            .filter(|(m, _)| eligible(m, p))
            .min_by_key(|(m, set)| (set.len(), **m))
            .map(|(m, _)| *m);
        if let Some(member) = lightest {
            owned.get_mut(member).expect("a member").insert(p);
        }
    }
    // Even out. Each move lowers the spread, so this ends.
    loop {
        let heaviest = owned
            .iter()
            .max_by_key(|(m, set)| (set.len(), std::cmp::Reverse(**m)))
            .map(|(m, s)| (*m, s.len()));
        let lightest = owned
            .iter()
            .min_by_key(|(m, set)| (set.len(), **m))
            .map(|(m, s)| (*m, s.len()));
        let (Some((heavy, heavy_count)), Some((light, light_count))) = (heaviest, lightest) else {
            break;
        };
        if heavy_count <= light_count + 1 {
            break;
        }
        let movable = owned[heavy].iter().rev().find(|p| eligible(light, p)).copied();
        let Some(p) = movable else {
            break; // heterogeneous subscriptions: nothing the lighter member may take
        };
        owned.get_mut(heavy).expect("a member").remove(p);
        owned.get_mut(light).expect("a member").insert(p);
    }
    owned
        .into_iter()
        .flat_map(|(member, set)| set.into_iter().map(move |p| (p.clone(), member.to_owned())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn partitions(topic: &str, count: u32) -> BTreeSet<TopicPartition> {
        (0..count)
            .map(|p| TopicPartition {
                topic: topic.into(),
                partition: PartitionId(p),
            })
            .collect()
    }

    fn members(ids: &[&str], topic: &str) -> BTreeMap<String, BTreeSet<String>> {
        ids.iter()
            .map(|m| ((*m).to_owned(), BTreeSet::from([topic.to_owned()])))
            .collect()
    }

    fn counts(assignment: &BTreeMap<TopicPartition, String>) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for member in assignment.values() {
            *counts.entry(member.as_str()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn three_members_on_twelve_partitions_get_four_each_and_moves_are_minimal() {
        let all = partitions("orders", 12);
        let three = assign(&members(&["a", "b", "c"], "orders"), &all, &BTreeMap::new());
        assert_eq!(
            counts(&three).values().copied().collect::<Vec<_>>(),
            vec![4, 4, 4]
        );

        // c leaves: only its four partitions move.
        let two = assign(&members(&["a", "b"], "orders"), &all, &three);
        let moved: Vec<_> = all.iter().filter(|p| three[*p] != two[*p]).collect();
        assert_eq!(moved.len(), 4);
        assert!(moved.iter().all(|p| three[*p] == "c"));

        // d joins: two move from each of a and b, nothing else.
        let again = assign(&members(&["a", "b", "d"], "orders"), &all, &two);
        assert_eq!(counts(&again)["d"], 4);
        assert_eq!(all.iter().filter(|p| two[*p] != again[*p]).count(), 4);
    }

    #[test]
    fn members_only_get_topics_they_subscribe_to() {
        let mut all = partitions("orders", 4);
        all.extend(partitions("returns", 2));
        let mut subscribed = members(&["a", "b"], "orders");
        subscribed.insert("c".into(), BTreeSet::from(["returns".to_owned()]));
        let assignment = assign(&subscribed, &all, &BTreeMap::new());
        for (p, member) in &assignment {
            assert!(subscribed[member].contains(&p.topic));
        }
        assert_eq!(assignment.len(), 6);
    }

    proptest! {
        #[test]
        fn balanced_complete_and_sticky(
            partition_count in 1u32..40,
            before in proptest::collection::btree_set("[a-h]", 1..6),
            after in proptest::collection::btree_set("[a-h]", 1..6),
        ) {
            let all = partitions("t", partition_count);
            let before: Vec<&str> = before.iter().map(String::as_str).collect();
            let after: Vec<&str> = after.iter().map(String::as_str).collect();
            let first = assign(&members(&before, "t"), &all, &BTreeMap::new());
            let second = assign(&members(&after, "t"), &all, &first);
            prop_assert_eq!(second.len(), all.len(), "every partition has an owner");
            let counts = counts(&second);
            let (min, max) = (counts.values().min().copied().unwrap_or(0), counts.values().max().copied().unwrap_or(0));
            prop_assert!(max - min <= 1 || counts.len() < after.len() && max <= 1, "balanced: {:?}", counts);
            // Sticky: a partition whose owner stayed and was not over its share stays.
            let share = all.len().div_ceil(after.len());
            let mut kept: BTreeMap<&str, usize> = BTreeMap::new();
            for p in &all {
                let old = first[p].as_str();
                if after.contains(&old) && second[p] == old {
                    *kept.entry(old).or_default() += 1;
                }
            }
            for member in &after {
                let had = first.values().filter(|m| m.as_str() == *member).count();
                prop_assert!(kept.get(member).copied().unwrap_or(0) >= had.min(share.saturating_sub(1)),
                    "{} kept too little", member);
            }
        }
    }
}
