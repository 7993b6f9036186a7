//! Slots: K bounded conversations, each a llama context on its own OS thread, and the bounded
//! queue in front of them.
//!
//! A slot remembers the token history it has ingested (its [`History`]), and a request that
//! extends it decodes only its new tokens; [`crate::conversation::delta`] owns that rule, the
//! one `chat` follows too. Among idle slots, a request goes to the one it extends furthest.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::conversation::chat::{ChatTemplate, Segment};
use crate::conversation::delta::{self, plan, History, Part, Plan};
use crate::conversation::generate::{generate, Limits, Stop};
use crate::engine::Engine;
use crate::error::Result;
use crate::ffi::{Model, Sampler, Token};

use super::api::{ApiError, Input, Params, Report, TokenInfo};
use super::stop::StopText;

/// The request's prompt as parts ([`delta::parts`]): a chat formatted with the template, or
/// raw text as one content.
pub fn prepare(model: &Model, template: &ChatTemplate, input: &Input) -> Result<Vec<Part>> {
    let segments = match input {
        Input::Chat(messages) => template.segments(messages, true)?,
        Input::Text(text) => vec![Segment {
            text: text.clone(),
            content: true,
        }],
        Input::Tools(chat) => super::tools::segments(model, chat)?,
    };
    delta::parts(model, segments)
}

/// The slot a prompt goes to among the idle ones (`(index, history, last use)`): the one whose
/// history it extends furthest, else the least recently used.
pub fn pick<'a>(
    idle: impl Iterator<Item = (usize, &'a History, u64)>,
    prompt: &[Part],
) -> Option<(usize, Plan)> {
    let mut best: Option<(usize, Plan, u64)> = None;
    for (i, h, used) in idle {
        let p = plan(h, prompt);
        let better = match &best {
            None => true,
            Some((_, b, b_used)) => match (p.reuse, b.reuse) {
                (true, false) => true,
                (true, true) => p.keep > b.keep,
                (false, false) => used < *b_used,
                (false, true) => false,
            },
        };
        if better {
            best = Some((i, p, used));
        }
    }
    best.map(|(i, p, _)| (i, p))
}

/// What a slot sends back while it serves a request.
#[derive(Debug)]
pub enum Event {
    /// Text of the reply, and the log-probabilities of the tokens whose text starts in it
    /// (empty unless asked for).
    Text(String, Vec<super::api::TokenInfo>),
    Done {
        finish: &'static str,
        report: Report,
    },
    Failed(ApiError),
}

struct SlotState {
    busy: bool,
    last_used: u64,
    history: History,
}

/// A request that holds a slot.
pub struct Lease {
    slot: usize,
    plan: Plan,
    permit: OwnedSemaphorePermit,
}

struct Job {
    plan: Plan,
    params: Params,
    events: mpsc::Sender<Event>,
    /// Released once the slot is idle again.
    permit: OwnedSemaphorePermit,
}

/// The slots, their queue, and the way to their threads.
pub struct Pool {
    slots: Mutex<Vec<SlotState>>,
    /// One permit per idle slot: a request holding one is sure to find an idle slot.
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_queue: usize,
    jobs: Mutex<Vec<std::sync::mpsc::Sender<Job>>>,
    clock: AtomicU64,
    shutdown: AtomicBool,
    counts: Counts,
}

/// Requests by outcome, for `/health`.
#[derive(Default)]
struct Counts {
    served: AtomicU64,
    /// Stopped because the client went away.
    cancelled: AtomicU64,
    /// Refused with 503: the queue was full.
    refused: AtomicU64,
}

/// What `/health` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Load {
    pub slots: usize,
    pub idle: usize,
    pub queued: usize,
    pub served: u64,
    pub cancelled: u64,
    pub refused: u64,
}

/// A started pool: its slot threads (joined at shutdown) and the KV bytes each slot reserved.
pub struct Started {
    pub pool: Arc<Pool>,
    pub threads: Vec<std::thread::JoinHandle<()>>,
    pub kv_bytes: Vec<usize>,
}

/// Counts a request as queued while it waits for a slot (also when its client goes away).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pool {
    /// Starts `n` slot threads; `make(i)` builds slot `i`'s engine on its thread.
    pub fn start(
        n: usize,
        max_queue: usize,
        make: Arc<dyn Fn(usize) -> Result<Engine> + Send + Sync>,
    ) -> Result<Started> {
        let pool = Arc::new(Pool {
            slots: Mutex::new(
                (0..n)
                    .map(|_| SlotState {
                        busy: false,
                        last_used: 0,
                        history: History::default(),
                    })
                    .collect(),
            ),
            permits: Arc::new(Semaphore::new(n)),
            waiting: AtomicUsize::new(0),
            max_queue,
            jobs: Mutex::new(Vec::new()),
            clock: AtomicU64::new(1),
            shutdown: AtomicBool::new(false),
            counts: Counts::default(),
        });
        let mut threads = Vec::with_capacity(n);
        let mut kv = Vec::with_capacity(n);
        let mut senders = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<usize>>();
            let make = Arc::clone(&make);
            let p = Arc::clone(&pool);
            let handle = std::thread::Builder::new()
                .name(format!("qfilters-slot-{i}"))
                .spawn(move || {
                    let engine = make(i).and_then(warm_up);
                    match engine {
                        Ok((engine, bytes)) => {
                            let _ = ready_tx.send(Ok(bytes));
                            slot_loop(i, engine, &rx, &p);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|e| crate::Error::io("cannot start a slot thread", e))?;
            threads.push(handle);
            senders.push(tx);
            match ready_rx.recv() {
                Ok(Ok(bytes)) => kv.push(bytes),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(crate::Error::invalid("a slot thread ended at start")),
            }
        }
        *lock(&pool.jobs) = senders;
        Ok(Started {
            pool,
            threads,
            kv_bytes: kv,
        })
    }

    pub fn slots(&self) -> usize {
        lock(&self.slots).len()
    }

    pub fn load(&self) -> Load {
        let slots = lock(&self.slots);
        Load {
            slots: slots.len(),
            idle: slots.iter().filter(|s| !s.busy).count(),
            queued: self.waiting.load(Ordering::SeqCst),
            served: self.counts.served.load(Ordering::Relaxed),
            cancelled: self.counts.cancelled.load(Ordering::Relaxed),
            refused: self.counts.refused.load(Ordering::Relaxed),
        }
    }

    /// Waits for an idle slot, in the queue if all are busy; 503 when the queue is full or the
    /// server is shutting down.
    pub async fn acquire(&self, prompt: &[Part]) -> std::result::Result<Lease, ApiError> {
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return Err(ApiError::shutting_down()),
            Err(TryAcquireError::NoPermits) => {
                if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    self.counts.refused.fetch_add(1, Ordering::Relaxed);
                    return Err(ApiError::overloaded(self.slots(), self.max_queue));
                }
                let _queued = Waiting(&self.waiting);
                Arc::clone(&self.permits)
                    .acquire_owned()
                    .await
                    .map_err(|_| ApiError::shutting_down())?
            }
        };
        let mut slots = lock(&self.slots);
        let idle = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.busy)
            .map(|(i, s)| (i, &s.history, s.last_used));
        let (slot, plan) =
            pick(idle, prompt).ok_or_else(|| ApiError::internal("no idle slot for a permit"))?;
        slots[slot].busy = true;
        Ok(Lease { slot, plan, permit })
    }

    /// Hands a leased slot its request; events come back on `events`.
    pub fn submit(
        &self,
        lease: Lease,
        params: Params,
        events: mpsc::Sender<Event>,
    ) -> std::result::Result<(), ApiError> {
        let Lease { slot, plan, permit } = lease;
        let job = Job {
            plan,
            params,
            events,
            permit,
        };
        let jobs = lock(&self.jobs);
        match jobs.get(slot).map(|tx| tx.send(job).is_ok()) {
            Some(true) => Ok(()),
            _ => {
                drop(jobs);
                self.release(slot, History::default());
                Err(ApiError::shutting_down())
            }
        }
    }

    /// Returns a leased slot unused (its history kept), then its permit.
    pub fn give_back(&self, lease: Lease) {
        let Lease { slot, permit, .. } = lease;
        if let Some(s) = lock(&self.slots).get_mut(slot) {
            s.busy = false;
        }
        drop(permit);
    }

    fn release(&self, slot: usize, history: History) {
        let mut slots = lock(&self.slots);
        let s = &mut slots[slot];
        s.busy = false;
        s.history = history;
        s.last_used = self.clock.fetch_add(1, Ordering::SeqCst);
    }

    /// Refuses queued and new requests, makes slots cut their replies at the next token, and
    /// lets the slot threads end once they are idle.
    pub fn shut_down(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.permits.close();
        lock(&self.jobs).clear();
    }

    fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }
}

/// A poisoned lock means a slot thread panicked holding it; the data (flags and histories)
/// is still consistent enough to go on serving.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Decodes one token so the cache tensors exist and their size is known, then empties the
/// cache: the KV memory is reserved at start, not on the first request.
fn warm_up(mut engine: Engine) -> Result<(Engine, usize)> {
    let model = Arc::clone(engine.model());
    let first = model.bos().unwrap_or(0);
    let mut sampler = Sampler::new(&model, &crate::ffi::SamplingParams::greedy())?;
    generate(
        &mut engine,
        &mut sampler,
        &[first],
        Limits::tokens(0),
        &mut |_, _| true,
        &mut |_| false,
    )?;
    let bytes = engine.stats().kv_bytes;
    engine.reset();
    Ok((engine, bytes))
}

fn slot_loop(slot: usize, mut engine: Engine, jobs: &std::sync::mpsc::Receiver<Job>, pool: &Pool) {
    // The engine's counters when the slot's conversation started: they are cumulative, and a
    // report counts from there (`Stats::since`).
    let mut started = engine.stats().clone();
    while let Ok(job) = jobs.recv() {
        let Job {
            plan,
            params,
            events,
            permit,
        } = job;
        let (history, last) = match serve_job(
            slot,
            &mut engine,
            &mut started,
            &plan,
            &params,
            &events,
            pool,
        ) {
            Ok(done) => done,
            // The cache may hold part of a request: the next one starts from scratch.
            Err(e) => (History::default(), Some(Event::Failed(e))),
        };
        // The slot is idle, with its history, before the client hears the reply is complete:
        // the conversation's next turn, sent at once, finds it free.
        pool.release(slot, history);
        drop(permit);
        if let Some(ev) = last {
            let _ = events.blocking_send(ev);
        }
    }
    // Freeing a context whose cache is on a lost RPC host would send ggml-rpc a command for
    // it, and ggml-rpc aborts on a lost connection: the process is ending, leave it be.
    if !crate::ffi::rpc::lost_hosts().is_empty() {
        std::mem::forget(engine);
    }
}

/// Why a reply ended early, besides the limit and the end of generation.
#[derive(Clone, Copy)]
enum Cut {
    None,
    ClientGone,
    Shutdown,
}

/// Runs one request on the slot's engine, sending the reply's text on `events`. Returns the
/// slot's new history and the event that ends the reply (`None`: the client is gone).
fn serve_job(
    slot: usize,
    engine: &mut Engine,
    started: &mut crate::engine::Stats,
    plan: &Plan,
    params: &Params,
    events: &mpsc::Sender<Event>,
    pool: &Pool,
) -> std::result::Result<(History, Option<Event>), ApiError> {
    let lib = |e: crate::Error| ApiError::internal(e.to_string());
    if !plan.reuse {
        engine.reset();
        *started = engine.stats().clone();
    }
    engine.reset_peak();
    let mut sampler = Sampler::new(engine.model(), &params.sampling).map_err(lib)?;
    let new_tokens = plan.new_tokens();
    let mut stop = StopText::new(params.stop.clone());
    let cut = std::cell::Cell::new(Cut::None);
    let model = Arc::clone(engine.model());
    // Log-probabilities of tokens whose text has not been released yet (stop strings hold text
    // back), each with where its text starts; `released` counts the characters sent.
    let mut pending: Vec<TokenInfo> = Vec::new();
    let mut generated = 0usize;
    let mut released = 0usize;
    let take = |pending: &mut Vec<TokenInfo>, released: usize| -> Vec<TokenInfo> {
        let n = pending.iter().take_while(|t| t.offset < released).count();
        pending.drain(..n).collect()
    };
    // Checked after every prefill chunk and every token: a client gone or a shutdown ends the
    // request there, so a long prompt whose client left frees the slot within one chunk.
    let go_on = || {
        if events.is_closed() {
            cut.set(Cut::ClientGone);
        } else if pool.shutting_down() {
            cut.set(Cut::Shutdown);
        }
        matches!(cut.get(), Cut::None)
    };
    let gen = generate(
        engine,
        &mut sampler,
        new_tokens,
        Limits::tokens(params.max_tokens),
        &mut |_, _| go_on(),
        // `piece` holds whole UTF-8 characters only (generate's one decoder).
        &mut |s| {
            if let Some(k) = params.logprobs {
                pending.push(token_info(&model, &s.logprob(k), generated));
            }
            generated += s.piece.chars().count();
            let text = stop.push(s.piece);
            released += text.chars().count();
            if !text.is_empty() {
                let lps = take(&mut pending, released);
                if events.blocking_send(Event::Text(text, lps)).is_err() {
                    cut.set(Cut::ClientGone);
                }
            }
            go_on() && !stop.stopped()
        },
    );
    let gen = match gen {
        Err(crate::Error::Interrupted) if !matches!(cut.get(), Cut::None) => None,
        other => Some(other.map_err(lib)?),
    };
    match cut.get() {
        Cut::ClientGone => {
            pool.counts.cancelled.fetch_add(1, Ordering::Relaxed);
            return Ok((History::default(), None));
        }
        Cut::Shutdown => return Err(ApiError::shutting_down()),
        Cut::None => {}
    }
    let Some(gen) = gen else {
        return Err(ApiError::internal("generation stopped without a reason"));
    };
    if !stop.stopped() {
        let mut rest = stop.push(&gen.tail);
        if !stop.stopped() {
            rest.push_str(&stop.finish());
        }
        released += rest.chars().count();
        let lps = take(&mut pending, released);
        if !rest.is_empty() && events.blocking_send(Event::Text(rest, lps)).is_err() {
            pool.counts.cancelled.fetch_add(1, Ordering::Relaxed);
            return Ok((History::default(), None));
        }
    }
    let finish = match gen.stop {
        Stop::Limit if !stop.stopped() => "length",
        _ => "stop",
    };
    let s = engine.stats().since(started);
    let report = Report {
        prompt_tokens: plan.tokens.len(),
        completion_tokens: gen.tokens.len(),
        budget: engine.budget(),
        live_cells: engine.live_cells(),
        peak_cells: s.peak_cells,
        evicted: s.evicted,
        prompt_tokens_decoded: new_tokens.len(),
        slot,
        reused: plan.reuse,
    };
    // Every accepted token went through the cache but the last one at the limit, which
    // generate leaves undecoded: the next turn decodes it first. The reply is kept as sampled:
    // the client sends back what it received, which equals it unless a stop string cut it
    // (then the next request does not match, and starts from scratch).
    let history = plan.history_after(&gen.text, &gen.tokens, gen.undecoded.is_some());
    pool.counts.served.fetch_add(1, Ordering::Relaxed);
    Ok((history, Some(Event::Done { finish, report })))
}

/// A token's log-probabilities with the tokens' text and bytes.
fn token_info(
    model: &Model,
    lp: &crate::conversation::generate::TokenLogprob,
    offset: usize,
) -> TokenInfo {
    let text = |t: Token| {
        let b = model.token_bytes(t, false);
        (String::from_utf8_lossy(&b).into_owned(), b)
    };
    let (t, bytes) = text(lp.token);
    TokenInfo {
        text: t,
        bytes,
        logprob: lp.logprob,
        offset,
        top: lp
            .top
            .iter()
            .map(|&(id, x)| {
                let (s, b) = text(id);
                (s, b, x)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::delta::test_parts::{c, history, t};

    #[test]
    fn the_slot_extended_furthest_wins_else_the_least_recently_used() {
        let a = history(vec![t("<u>", &[1]), c("hi", &[2])]);
        let b = history(vec![t("<u>", &[1])]);
        let empty = History::default();
        let prompt = [t("<u>", &[1]), c("hi", &[2]), t("<a>", &[3])];
        let slots = [(0, &b, 5), (1, &a, 9), (2, &empty, 0)];
        assert_eq!(
            pick(slots.iter().copied(), &prompt).map(|(i, _)| i),
            Some(1)
        );
        let other = [c("x", &[40])];
        assert_eq!(pick(slots.iter().copied(), &other).map(|(i, _)| i), Some(2));
        assert!(pick(std::iter::empty(), &other).is_none());
    }
}
