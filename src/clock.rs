//! Processing time, in Unix seconds.

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}
