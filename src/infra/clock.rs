//! Processing time, in Unix seconds.

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Now in Unix seconds with a fraction, for latencies.
pub fn now_f64() -> f64 {
    chrono::Utc::now().timestamp_micros() as f64 / 1e6
}
