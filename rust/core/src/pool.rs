//! Thread pools for the parallel paths, one per requested thread count, built once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rayon::ThreadPool;

use crate::error::{CodecError, Result};

/// The most threads a caller may ask for.
pub const MAX_THREADS: usize = 256;

/// The number of threads `threads` means: 0 is every core rayon sees.
pub fn effective_threads(threads: usize) -> usize {
    if threads == 0 {
        rayon::current_num_threads().max(1)
    } else {
        threads
    }
}

/// Checks a thread-count parameter.
pub fn check_threads(threads: usize) -> Result<()> {
    if threads > MAX_THREADS {
        return Err(CodecError::InvalidArgument(format!(
            "threads must be 0 (all cores) to {MAX_THREADS}, got {threads}"
        )));
    }
    Ok(())
}

/// Runs `op` on a pool of `threads` workers (0: rayon's global pool, one per core).
pub fn run_in_pool<R: Send>(threads: usize, op: impl FnOnce() -> R + Send) -> Result<R> {
    check_threads(threads)?;
    if threads == 0 {
        return Ok(op());
    }
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<ThreadPool>>>> = OnceLock::new();
    let pool = {
        let mut pools = POOLS
            .get_or_init(|| Mutex::new(HashMap::new()))
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match pools.get(&threads) {
            Some(p) => Arc::clone(p),
            None => {
                let p = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("fl-codec-{i}"))
                    .build()
                    .map_err(|e| CodecError::InvalidArgument(format!("thread pool: {e}")))?;
                let p = Arc::new(p);
                pools.insert(threads, Arc::clone(&p));
                p
            }
        }
    };
    Ok(pool.install(op))
}
