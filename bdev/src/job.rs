//! The background job runner: long work (rebuilds, checksums, copies,
//! inflate) chopped into bounded steps, run on the core that owns the
//! data, yielding to foreground I/O.
//!
//! A [`Job`] is a state machine whose async [`Job::step`] does one bounded
//! piece of work (a cluster, a window) and awaits its own I/O. [`spawn`]
//! builds the job on the chosen core and runs it there: steps follow each
//! other until a turn has used its time budget, then the runner yields the
//! reactor (pollers, completions, other tasks run) and starts a new turn.
//! Between steps it checks the job's [`reactor::CancelToken`] and its
//! optional rate limit. Progress (units done and total) is readable from
//! any core through the [`JobHandle`]; the result is awaited with
//! [`JobHandle::wait`].
//!
//! Invariants:
//! - Steps never overlap and never run concurrently with a cancel's end:
//!   [`JobHandle::cancel`] resolves only once the job stopped at a step
//!   boundary and was dropped, so the I/O its last step awaited has
//!   completed and its buffers and channels are released.
//! - A turn starts no new step once the budget is used. A step's own
//!   synchronous work is not preempted: a job keeps each step small (the
//!   runner counts steps that ran past the budget in
//!   [`JobProgress::over_budget`]).
//! - With a rate limit of `r` units (or bytes) per second, the work done
//!   `t` seconds after the start never exceeds `r * t` plus one step (the
//!   pace is measured from the start, also when [`Job::rate`] changes it).
//! - The job's buffers ([`JobOptions::buffers`]) come from this core's
//!   pool once, at the start, and are reused by every step
//!   ([`StepCx::take_buf`], [`StepCx::put_buf`]) until the job ends.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reactor::{CancelToken, CoreId};

use crate::error::{BdevError, Result};
use crate::io::IoBuf;

/// Default time a turn may run steps before yielding: short enough that
/// foreground I/O on the core waits at most about this long for the
/// reactor, long enough that a turn's bookkeeping is noise.
pub const DEFAULT_TURN_BUDGET: Duration = Duration::from_micros(500);

/// What a step achieved.
#[derive(Debug)]
pub enum Step<T> {
    /// Work done; more to do. `units` count toward progress (and a
    /// [`RateLimit::UnitsPerSec`]), `bytes` toward a
    /// [`RateLimit::BytesPerSec`].
    Progress { units: u64, bytes: u64 },
    /// Finished with this result.
    Done(T),
}

/// One piece of long background work, stepped by the runner on its core.
pub trait Job: 'static {
    type Output: Send + 'static;

    /// Units of work in all (progress total); asked after every step, so
    /// it may change.
    fn total_units(&self) -> u64;

    /// Does one bounded step and awaits its I/O. An error ends the job.
    fn step(&mut self, cx: &mut StepCx) -> impl Future<Output = Result<Step<Self::Output>>>;

    /// A rate limit that may change while the job runs (a setting), asked
    /// before every step; None: [`JobOptions::rate`].
    fn rate(&self) -> Option<RateLimit> {
        None
    }
}

/// Caps the pace of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimit {
    UnitsPerSec(u64),
    BytesPerSec(u64),
}

#[derive(Clone)]
pub struct JobOptions {
    /// Steps run back to back for at most this long before the runner
    /// yields.
    pub budget: Duration,
    pub rate: Option<RateLimit>,
    /// `(count, bytes)`: buffers the job owns for its lifetime.
    pub buffers: (usize, usize),
    /// The token to run under (None: a fresh one). A caller may hold its
    /// own [`reactor::WorkGuard`] on it, so that a cancel also waits for
    /// follow-up work after the job (recording the result).
    pub cancel: Option<CancelToken>,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            budget: DEFAULT_TURN_BUDGET,
            rate: None,
            buffers: (0, 0),
            cancel: None,
        }
    }
}

/// What a step gets from the runner.
pub struct StepCx {
    bufs: Vec<IoBuf>,
    token: CancelToken,
}

impl StepCx {
    /// One of the job's buffers, to move into an I/O; give it back with
    /// [`StepCx::put_buf`]. None when all are out.
    pub fn take_buf(&mut self) -> Option<IoBuf> {
        self.bufs.pop()
    }

    pub fn put_buf(&mut self, b: IoBuf) {
        self.bufs.push(b);
    }

    /// Whether a cancel was asked: a step that waits on something slow
    /// may give way early (the runner stops at the next boundary anyway).
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum JobState {
    Running,
    Done,
    Cancelled,
    Failed,
}

impl JobState {
    fn from_u8(v: u8) -> JobState {
        match v {
            1 => JobState::Done,
            2 => JobState::Cancelled,
            3 => JobState::Failed,
            _ => JobState::Running,
        }
    }
}

/// A job's progress, written by its core, read from any.
#[derive(Debug, Default)]
pub struct JobProgress {
    pub done_units: AtomicU64,
    pub total_units: AtomicU64,
    pub steps: AtomicU64,
    /// Steps that ran longer than the turn budget.
    pub over_budget: AtomicU64,
    state: AtomicU8,
}

impl JobProgress {
    pub fn state(&self) -> JobState {
        JobState::from_u8(self.state.load(Ordering::Acquire))
    }
}

/// How a job ended.
#[derive(Debug)]
pub enum JobEnd<T> {
    Done(T),
    /// Stopped by a cancel at a step boundary.
    Cancelled,
}

/// The controller's side of a job. `Send`: any core may hold it.
pub struct JobHandle<T> {
    token: CancelToken,
    progress: Arc<JobProgress>,
    result: reactor::CompletionEvent<Result<JobEnd<T>>>,
}

impl<T: Send + 'static> JobHandle<T> {
    /// `(done, total)` units.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.progress.done_units.load(Ordering::Acquire),
            self.progress.total_units.load(Ordering::Acquire),
        )
    }

    pub fn stats(&self) -> &Arc<JobProgress> {
        &self.progress
    }

    pub fn state(&self) -> JobState {
        self.progress.state()
    }

    /// The token that cancels the job (clone it to cancel from elsewhere).
    pub fn token(&self) -> &CancelToken {
        &self.token
    }

    /// Asks the job to stop at its next step boundary and resolves once it
    /// has (its last step's I/O done, the job dropped). At once if it has
    /// already ended.
    pub async fn cancel(&self) {
        self.token.cancel().await;
    }

    /// The job's result. `Cancelled` in `JobEnd` after a cancel; an error
    /// if a step failed or the job's core stopped.
    pub async fn wait(self) -> Result<JobEnd<T>> {
        match self.result.await {
            Ok(r) => r,
            Err(_) => Err(BdevError::Cancelled),
        }
    }
}

/// Builds a job on `core` with `make` and runs it there (see the module
/// docs). `make` failing fails the job.
pub fn spawn<J, F>(core: CoreId, opts: JobOptions, make: F) -> JobHandle<J::Output>
where
    J: Job,
    F: FnOnce() -> Result<J> + Send + 'static,
{
    let token = opts.cancel.clone().unwrap_or_default();
    let progress = Arc::new(JobProgress::default());
    let (tx, rx) = reactor::completion();
    // None: the token was already cancelled; the job stops before its
    // first step.
    let guard = token.begin().ok();
    let (t, p) = (token.clone(), progress.clone());
    let sent = reactor::send(core, move || {
        reactor::spawn_local(async move {
            let end = run(make, opts, &t, &p).await;
            let state = match &end {
                Ok(JobEnd::Done(_)) => JobState::Done,
                Ok(JobEnd::Cancelled) => JobState::Cancelled,
                Err(_) => JobState::Failed,
            };
            p.state.store(state as u8, Ordering::Release);
            // The job and its buffers are gone: a cancel may resolve.
            drop(guard);
            tx.complete(end);
        })
    });
    if !sent {
        log::warn!("job: no reactor on core {core:?}");
    }
    JobHandle {
        token,
        progress,
        result: rx,
    }
}

async fn run<J, F>(
    make: F,
    opts: JobOptions,
    token: &CancelToken,
    p: &JobProgress,
) -> Result<JobEnd<J::Output>>
where
    J: Job,
    F: FnOnce() -> Result<J>,
{
    let mut job = make()?;
    let (count, len) = opts.buffers;
    let mut cx = StepCx {
        bufs: (0..count).map(|_| IoBuf::new(len)).collect(),
        token: token.clone(),
    };
    p.total_units.store(job.total_units(), Ordering::Release);
    let started = Instant::now();
    let (mut units, mut bytes) = (0u64, 0u64);
    loop {
        let turn = Instant::now();
        loop {
            if token.is_cancelled() {
                return Ok(JobEnd::Cancelled);
            }
            let rate = job.rate().or(opts.rate);
            if let Some(wait) = rate_wait(rate, units, bytes, started.elapsed()) {
                reactor::sleep(wait).await;
                break;
            }
            let t0 = Instant::now();
            let step = job.step(&mut cx).await?;
            p.steps.fetch_add(1, Ordering::AcqRel);
            if t0.elapsed() > opts.budget {
                p.over_budget.fetch_add(1, Ordering::AcqRel);
            }
            match step {
                Step::Done(v) => return Ok(JobEnd::Done(v)),
                Step::Progress { units: u, bytes: b } => {
                    units += u;
                    bytes += b;
                    p.done_units.store(units, Ordering::Release);
                    p.total_units.store(job.total_units(), Ordering::Release);
                }
            }
            if turn.elapsed() >= opts.budget {
                break;
            }
        }
        // Let the reactor serve foreground work before the next turn.
        futures_lite::future::yield_now().await;
    }
}

/// How long to wait before the next step to stay within `rate`, if at all.
fn rate_wait(
    rate: Option<RateLimit>,
    units: u64,
    bytes: u64,
    elapsed: Duration,
) -> Option<Duration> {
    let (done, per_sec) = match rate? {
        RateLimit::UnitsPerSec(r) => (units, r),
        RateLimit::BytesPerSec(r) => (bytes, r),
    };
    if per_sec == 0 {
        return None;
    }
    let due = Duration::from_secs_f64(done as f64 / per_sec as f64);
    due.checked_sub(elapsed).filter(|d| !d.is_zero())
}

#[cfg(test)]
#[path = "job_tests.rs"]
mod tests;
