//! The agent's speed score: a fixed CPU workload timed once at start.

use std::time::Instant;

/// Rounds of the workload; a few hundred milliseconds on a current core.
const ROUNDS: u64 = 40_000_000;

/// Runs the fixed workload and returns a score proportional to speed (rounds per millisecond).
/// Blocking: call it from a blocking thread.
pub fn measure_benchmark() -> u64 {
    let started = Instant::now();
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    for round in 0..ROUNDS {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state = state.wrapping_add(round);
    }
    std::hint::black_box(state);
    let millis = started.elapsed().as_millis().max(1) as u64;
    (ROUNDS / millis).max(1)
}
