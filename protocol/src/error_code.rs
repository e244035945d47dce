//! Error codes on the wire. The numbers never change; new codes are only added.

use std::fmt;

macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $name:ident = $value:literal, $text:literal, $retriable:literal;)*) => {
        /// Why a request, or one item of it, failed. `None` (0) means success.
        #[repr(u16)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[doc = $doc])* $name = $value,)*
        }

        impl ErrorCode {
            /// Every code, in numeric order (for documentation and tests).
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            pub fn from_u16(value: u16) -> Option<ErrorCode> {
                match value {
                    $($value => Some(ErrorCode::$name),)*
                    _ => None,
                }
            }

            /// Whether sending the same request again may succeed.
            pub fn is_retriable(self) -> bool {
                match self {
                    $(ErrorCode::$name => $retriable,)*
                }
            }

            /// The code's name in `SCREAMING_SNAKE_CASE`, as in docs/PROTOCOL.md.
            pub fn name(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => $text,)*
                }
            }
        }
    };
}

error_codes! {
    /// Success.
    None = 0, "NONE", false;
    /// The broker does not support this version of the API.
    UnsupportedVersion = 1, "UNSUPPORTED_VERSION", false;
    /// The broker does not know this API key.
    UnknownApiKey = 2, "UNKNOWN_API_KEY", false;
    /// The first request on a connection must be ApiVersions.
    HandshakeRequired = 3, "HANDSHAKE_REQUIRED", false;
    /// The request could not be decoded; the message says where.
    MalformedRequest = 4, "MALFORMED_REQUEST", false;
    /// The frame is longer than the broker's `frame_bytes_max`; the connection is closed.
    FrameTooLarge = 5, "FRAME_TOO_LARGE", false;
    /// Topic names are 1 to 249 bytes of `[A-Za-z0-9._-]`, not `.` or `..`.
    InvalidTopicName = 6, "INVALID_TOPIC_NAME", false;
    UnknownTopic = 7, "UNKNOWN_TOPIC", false;
    TopicAlreadyExists = 8, "TOPIC_ALREADY_EXISTS", false;
    UnknownPartition = 9, "UNKNOWN_PARTITION", false;
    UnknownLane = 10, "UNKNOWN_LANE", false;
    /// A topic setting is unknown or has a bad value; the message names it.
    InvalidConfig = 11, "INVALID_CONFIG", false;
    /// A record batch failed its checks (checksum, structure, producer fields).
    InvalidBatch = 12, "INVALID_BATCH", false;
    /// A record batch is larger than the broker's `batch_bytes_max`.
    BatchTooLarge = 13, "BATCH_TOO_LARGE", false;
    /// The offset is before the start or after the end of the lane log.
    OffsetOutOfRange = 14, "OFFSET_OUT_OF_RANGE", false;
    /// An idempotent producer's sequence number is not the next one expected.
    OutOfOrderSequence = 15, "OUT_OF_ORDER_SEQUENCE", true;
    /// A newer epoch of this producer id exists.
    ProducerFenced = 16, "PRODUCER_FENCED", false;
    /// The broker's disk is full; nothing was written. Retry when space is freed.
    StorageFull = 17, "STORAGE_FULL", true;
    /// The lane log stopped accepting writes after an I/O failure (fail-stop).
    StorageFailed = 18, "STORAGE_FAILED", false;
    /// Stored data is damaged at or before the requested offset.
    CorruptData = 19, "CORRUPT_DATA", false;
    /// The records were written but were not durable within the request's timeout;
    /// an idempotent retry is answered with their offsets.
    RequestTimedOut = 20, "REQUEST_TIMED_OUT", true;
    /// The broker is shutting down.
    ShuttingDown = 21, "SHUTTING_DOWN", true;
    /// A broker limit (topics, partitions, connections…) would be exceeded.
    LimitExceeded = 22, "LIMIT_EXCEEDED", false;
    /// An unexpected broker error; the message says more.
    Internal = 23, "INTERNAL", true;
    /// An idempotent producer's batch was appended long ago: it is a retry older than the
    /// batches the broker remembers, so its offsets are no longer known.
    DuplicateSequence = 24, "DUPLICATE_SEQUENCE", false;
    /// The group does not know this member (never joined, left, or its session timed
    /// out): join again.
    UnknownMember = 25, "UNKNOWN_MEMBER", false;
    /// The member does not own this partition now: a commit from a former owner.
    NotPartitionOwner = 26, "NOT_PARTITION_OWNER", false;
    /// Group names follow the rules of topic names.
    InvalidGroupName = 27, "INVALID_GROUP_NAME", false;
    UnknownGroup = 28, "UNKNOWN_GROUP", false;
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_dense_and_named() {
        for (index, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*code as u16, index as u16);
            assert_eq!(ErrorCode::from_u16(index as u16), Some(*code));
        }
        assert_eq!(ErrorCode::from_u16(ErrorCode::ALL.len() as u16), None);
        assert_eq!(ErrorCode::StorageFull.to_string(), "STORAGE_FULL (17)");
    }
}
