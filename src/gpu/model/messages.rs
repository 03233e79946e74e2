//! Pipeline messages that stay on the device: what a stage sends is read from, and what it
//! receives is written into, device buffers by the stage's device links (`src/gpu/stage.rs`),
//! with no copy through the host.
//!
//! A received message lands in a buffer of its own (a stage's input, or its output's
//! gradient, by microbatch), together with what orders reads after its arrival (`ready`: the
//! link's event, waited for by the compute stream); the forward ([`StageInput::Arrived`]) or
//! the backward (no output gradient given to a range without the head) copies it into the
//! activations or the backward scratch — one device copy — and the buffer is free again. A
//! stage's output is sent from its activations as they are (they live until its backward); its
//! input gradient, which the next backward overwrites, is first copied into a buffer kept until
//! the send is queued ([`GpuGpt::keep_input_grad`]); a freed buffer whose send may still be
//! reading it is written again only after the send's `ready`.
//!
//! Every `ready` is a point where the compute stream may stall for a peer: its device time is
//! recorded ([`crate::gpu::Gpu::stream_time`] before and after) and summed by
//! [`GpuGpt::take_stalled_seconds`] — the pipeline bubble of a step whose messages travel on
//! the devices, which no host clock sees (the host only queues the waits).
//!
//! Messages on device links carry checksums (`crate::gpu::ops::checksum`), as host messages
//! carry a CRC32: the sender computes one into a slot ([`GpuGpt::checksum_slot`]) and sends it
//! after the message; the receiver receives it into a slot of its own and, when the message is
//! read (after its `ready`, so the compute stream never waits for a transfer earlier than it
//! would), computes the message's checksum next to it. [`GpuGpt::verify_checksums`] compares
//! the step's pairs once every message has landed and been read.
//!
//! [`StageInput::Arrived`]: crate::models::gpt::StageInput::Arrived

use std::collections::HashMap;

use super::GpuGpt;
use crate::gpu::ops::checksum;
use crate::gpu::{Dev, Gpu, GpuError, StreamTime};
use crate::models::gpt::GradRef;

/// What orders later GPU work after a message's transfer (see the module docs).
pub type Ready = Box<dyn FnOnce() -> Result<(), GpuError> + Send>;

/// A message buffer and what must run before it is read (an arrival) or written again (a
/// buffer a send may still read).
pub(super) struct Held<B> {
    buf: B,
    ready: Option<Ready>,
}

/// Which arrival of a microbatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arrival {
    /// The input of a range without the embedding.
    Input,
    /// The gradient of the output of a range without the head.
    OutputGrad,
}

/// Bytes of one checksum slot: the sender's checksum (computed before the send, or received
/// after the message) and the checksum of the message as it was read on arrival.
const SLOT_BYTES: usize = 16;
/// Slots per device buffer of slots (a step that needs more adds buffers).
const SLOTS_PER_CHUNK: usize = 64;

/// How an arrival is handled when it is read: the slot its checksum goes into (none without
/// checksums), and whether to damage it first (fault injection: a link that damaged it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArrivalCheck {
    pub slot: Option<usize>,
    pub damage: bool,
}

/// What a slot holds the checksums of, for the error of a mismatch: `what` ("activation",
/// "gradient") of microbatch `mb`, sent by rank `from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SumLabel {
    pub what: &'static str,
    pub mb: u64,
    pub from: usize,
}

/// The stage's pipeline messages on the device.
pub(super) struct Messages<B> {
    inputs: HashMap<u64, Held<B>>,
    douts: HashMap<u64, Held<B>>,
    outgoing: HashMap<u64, B>,
    free: Vec<Held<B>>,
    /// The compute stream's time before and after each wait for a transfer, since the last
    /// [`GpuGpt::take_stalled_seconds`].
    stalls: Vec<(StreamTime, StreamTime)>,
    /// Device buffers of checksum slots, [`SLOTS_PER_CHUNK`] each.
    sum_chunks: Vec<B>,
    /// The slots used this step, in order: a received message's label, `None` for a sent one.
    sum_labels: Vec<Option<SumLabel>>,
    /// Arrivals whose checksum is computed when they are read.
    checks: HashMap<(Arrival, u64), ArrivalCheck>,
}

impl<B> Default for Messages<B> {
    fn default() -> Self {
        Messages {
            inputs: HashMap::new(),
            douts: HashMap::new(),
            outgoing: HashMap::new(),
            free: Vec::new(),
            stalls: Vec::new(),
            sum_chunks: Vec::new(),
            sum_labels: Vec::new(),
            checks: HashMap::new(),
        }
    }
}

impl<B> Messages<B> {
    /// Runs what every held buffer still waits for (before the buffers go).
    pub(super) fn settle(&mut self) -> Result<(), GpuError> {
        let mut first = Ok(());
        for h in self.inputs.values_mut().chain(self.douts.values_mut()).chain(self.free.iter_mut()) {
            if let Some(r) = h.ready.take() {
                let r = r();
                if first.is_ok() {
                    first = r;
                }
            }
        }
        first
    }
}

fn bad(op: &'static str, detail: String) -> GpuError {
    GpuError::Shape { op, detail }
}

impl<G: Gpu> GpuGpt<'_, G> {
    /// Elements of a message between stages for `batch` × `seq` tokens (hidden states or their
    /// gradient, `[B,T,C]` in the model's dtype).
    pub fn message_elems(&self, batch: usize, seq: usize) -> usize {
        batch * seq * self.cfg.hidden_size
    }

    /// A device buffer for a message of `elems` elements: a free one of that size (once what it
    /// waits for ran), or a new one.
    ///
    /// # Errors
    /// Out of device memory; the error of a send the buffer waited for.
    pub fn message_buffer(&mut self, elems: usize) -> Result<G::Buf, GpuError> {
        let bytes = elems * self.dtype.size();
        let m = &mut self.messages;
        if let Some(i) = m.free.iter().position(|h| self.gpu.buf_len(&h.buf) == bytes) {
            let h = m.free.swap_remove(i);
            self.wait_ready(h.ready)?;
            return Ok(h.buf);
        }
        self.gpu.alloc(bytes)
    }

    /// Runs `ready` (orders the compute stream after a transfer), recording how long the
    /// compute stream stalls there (see the module docs).
    fn wait_ready(&mut self, ready: Option<Ready>) -> Result<(), GpuError> {
        let Some(r) = ready else { return Ok(()) };
        let before = self.gpu.stream_time()?;
        r()?;
        let after = self.gpu.stream_time()?;
        self.messages.stalls.push((before, after));
        Ok(())
    }

    /// Seconds the compute stream stalled waiting for message transfers since the last call
    /// (waits, bounded, for the device to pass the last of those waits).
    ///
    /// # Errors
    /// Reading the device's times fails or times out.
    pub fn take_stalled_seconds(&mut self) -> Result<f64, GpuError> {
        let stalls = std::mem::take(&mut self.messages.stalls);
        let mut total = 0.0;
        for (before, after) in &stalls {
            total += self.gpu.stream_seconds(before, after)?;
        }
        Ok(total)
    }

    /// Gives `buf` (from [`GpuGpt::message_buffer`]) as the input of microbatch `mb`'s coming
    /// forward, which runs `ready` before it reads it.
    ///
    /// # Errors
    /// A range with the embedding (it takes tokens); an input of `mb` already waiting. The
    /// buffer is then kept as a free one behind `ready` (a transfer into it may be queued).
    pub fn input_arriving(&mut self, mb: u64, buf: G::Buf, ready: Option<Ready>) -> Result<(), GpuError> {
        let wrong_end = self
            .range
            .embedding
            .then_some("this layer range starts with the embedding: it receives no hidden states");
        self.arrive(Arrival::Input, mb, Held { buf, ready }, wrong_end)
    }

    /// Gives `buf` as the gradient of microbatch `mb`'s output for its coming backward (called
    /// without an output gradient), which runs `ready` before it reads it.
    ///
    /// # Errors
    /// A range with the head (it starts from its dlogits); a gradient of `mb` already waiting.
    /// The buffer is then kept as a free one behind `ready`.
    pub fn output_grad_arriving(
        &mut self,
        mb: u64,
        buf: G::Buf,
        ready: Option<Ready>,
    ) -> Result<(), GpuError> {
        let wrong_end =
            self.range.head.then_some("the head range starts from its dlogits: it receives no gradient");
        self.arrive(Arrival::OutputGrad, mb, Held { buf, ready }, wrong_end)
    }

    /// Files `held` as `mb`'s arrival of `kind`, unless this range takes none (`wrong_end`) or
    /// one is waiting already; a refused buffer stays as a free one behind its `ready`.
    fn arrive(
        &mut self,
        kind: Arrival,
        mb: u64,
        held: Held<G::Buf>,
        wrong_end: Option<&str>,
    ) -> Result<(), GpuError> {
        let (op, what, map) = match kind {
            Arrival::Input => ("GpuGpt::input_arriving", "input", &mut self.messages.inputs),
            Arrival::OutputGrad => {
                ("GpuGpt::output_grad_arriving", "output gradient", &mut self.messages.douts)
            }
        };
        let refused = match wrong_end {
            Some(w) => Some(w.to_string()),
            None if map.contains_key(&mb) => {
                Some(format!("the {what} of microbatch {mb} already arrived and was not used"))
            }
            None => None,
        };
        match refused {
            Some(detail) => {
                self.messages.free.push(held);
                Err(bad(op, detail))
            }
            None => {
                map.insert(mb, held);
                Ok(())
            }
        }
    }

    /// Whether microbatch `mb`'s input arrived on the device.
    pub fn has_arrived_input(&self, mb: u64) -> bool {
        self.messages.inputs.contains_key(&mb)
    }

    /// Whether microbatch `mb`'s output gradient arrived on the device.
    pub fn has_arrived_output_grad(&self, mb: u64) -> bool {
        self.messages.douts.contains_key(&mb)
    }

    /// For a backward of `mb` given `dout`: the output gradient that arrived on the device
    /// when none is given to a range without the head (readable once this returns), else
    /// `None`. A given one with one waiting is an error (the arrival would be left behind).
    pub(super) fn arrived_dout(
        &mut self,
        op: &'static str,
        mb: u64,
        dout: Option<GradRef<'_>>,
    ) -> Result<Option<G::Buf>, GpuError> {
        match (dout, self.range.head) {
            (None, false) => self.take_arrived_dout(mb).transpose(),
            (Some(_), _) if self.has_arrived_output_grad(mb) => Err(bad(
                op,
                format!("an output gradient of microbatch {mb} was given, and another arrived on the device"),
            )),
            _ => Ok(None),
        }
    }

    /// The arrived input of `mb`, readable once this returns (its `ready` ran).
    pub(super) fn take_arrived_input(&mut self, op: &'static str, mb: u64) -> Result<G::Buf, GpuError> {
        let h = self.messages.inputs.remove(&mb).ok_or_else(|| {
            bad(
                op,
                format!(
                    "the input of microbatch {mb} was to arrive on the device, and has not been received"
                ),
            )
        })?;
        self.wait_ready(h.ready)?;
        self.checksum_arrival(Arrival::Input, mb, &h.buf)?;
        Ok(h.buf)
    }

    /// The arrived output gradient of `mb`, readable once this returns.
    pub(super) fn take_arrived_dout(&mut self, mb: u64) -> Option<Result<G::Buf, GpuError>> {
        let h = self.messages.douts.remove(&mb)?;
        let r =
            self.wait_ready(h.ready).and_then(|()| self.checksum_arrival(Arrival::OutputGrad, mb, &h.buf));
        Some(r.map(|()| h.buf))
    }

    /// A zeroed checksum slot for one of this step's messages: `label` names a received one
    /// (its two checksums are compared by [`GpuGpt::verify_checksums`]), `None` a sent one.
    ///
    /// # Errors
    /// Out of device memory; device errors.
    pub fn checksum_slot(&mut self, label: Option<SumLabel>) -> Result<usize, GpuError> {
        let slot = self.messages.sum_labels.len();
        if slot / SLOTS_PER_CHUNK == self.messages.sum_chunks.len() {
            let chunk = self.gpu.alloc(SLOTS_PER_CHUNK * SLOT_BYTES)?;
            self.messages.sum_chunks.push(chunk);
        }
        self.gpu.zero(self.checksum_dev(slot, false)?, SLOT_BYTES)?;
        self.messages.sum_labels.push(label);
        Ok(slot)
    }

    /// Where `slot`'s sender checksum (`arrived` false: 8 bytes, sent or received as two fp32
    /// words) or the checksum of the message read on arrival lives.
    ///
    /// # Errors
    /// A slot this step's [`GpuGpt::checksum_slot`] did not give.
    pub fn checksum_dev(&self, slot: usize, arrived: bool) -> Result<Dev<'_, G::Buf>, GpuError> {
        let chunk = self.messages.sum_chunks.get(slot / SLOTS_PER_CHUNK).ok_or_else(|| {
            bad("GpuGpt::checksum_dev", format!("checksum slot {slot} was not given out this step"))
        })?;
        let offset = (slot % SLOTS_PER_CHUNK) * SLOT_BYTES + if arrived { 8 } else { 0 };
        Ok(Dev { buf: chunk, offset })
    }

    /// Queues the checksum of the `bytes` at `data` (a message about to be sent) into `slot`'s
    /// sender checksum.
    ///
    /// # Errors
    /// As [`checksum::message_checksum`]; a slot not given out.
    pub fn checksum_sent(&self, data: Dev<'_, G::Buf>, bytes: usize, slot: usize) -> Result<(), GpuError> {
        checksum::message_checksum(self.gpu, data, bytes, self.checksum_dev(slot, false)?)
    }

    /// Checks `mb`'s arrival of `kind` when it is read: its checksum goes into `check.slot`,
    /// after damaging it for an injected fault (`check.damage`).
    pub fn check_arrival(&mut self, kind: Arrival, mb: u64, check: ArrivalCheck) {
        self.messages.checks.insert((kind, mb), check);
    }

    /// Runs the check of `mb`'s arrival of `kind` (just made readable), if it has one.
    fn checksum_arrival(&mut self, kind: Arrival, mb: u64, buf: &G::Buf) -> Result<(), GpuError> {
        let Some(c) = self.messages.checks.remove(&(kind, mb)) else { return Ok(()) };
        if c.damage {
            checksum::damage_message(self.gpu, Dev::new(buf))?;
        }
        match c.slot {
            Some(slot) => {
                let bytes = self.gpu.buf_len(buf);
                checksum::message_checksum(self.gpu, Dev::new(buf), bytes, self.checksum_dev(slot, true)?)
            }
            None => Ok(()),
        }
    }

    /// Compares the checksums of the messages received this step (every one landed and read:
    /// after the links finished) and starts over for the next step.
    ///
    /// # Errors
    /// [`GpuError::Corrupt`] for the first message whose checksums differ; reading them fails.
    pub fn verify_checksums(&mut self) -> Result<(), GpuError> {
        let labels = std::mem::take(&mut self.messages.sum_labels);
        self.messages.checks.clear();
        if labels.iter().all(Option::is_none) {
            return Ok(());
        }
        let mut raw = vec![0u8; labels.len() * SLOT_BYTES];
        for (chunk, dst) in self.messages.sum_chunks.iter().zip(raw.chunks_mut(SLOTS_PER_CHUNK * SLOT_BYTES))
        {
            self.gpu.download(chunk, 0, dst)?;
        }
        let word = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().unwrap_or_default());
        for (slot, label) in labels.iter().enumerate() {
            let Some(l) = label else { continue };
            let (sent, got) = (word(slot * SLOT_BYTES), word(slot * SLOT_BYTES + 8));
            if sent != got {
                return Err(GpuError::Corrupt { what: l.what, mb: l.mb, from: l.from, got, sent });
            }
        }
        Ok(())
    }

    /// Forgets the checksums of a step that did not finish (its slots are given out again).
    pub fn reset_checksums(&mut self) {
        self.messages.sum_labels.clear();
        self.messages.checks.clear();
    }

    /// A message buffer whose contents were used (copied out), free for the next message.
    pub(super) fn recycle_message(&mut self, buf: G::Buf) {
        self.messages.free.push(Held { buf, ready: None });
    }

    /// A message buffer free once `ready` ran (a transfer that may still read or write it was
    /// queued): its next user, or the model's end, runs it first.
    pub fn recycle_message_after(&mut self, buf: G::Buf, ready: Option<Ready>) {
        self.messages.free.push(Held { buf, ready });
    }

    /// The device range and element count of in-flight microbatch `mb`'s output (what a stage
    /// without the head sends), in the model's dtype. It stays put until `mb`'s backward.
    ///
    /// # Errors
    /// `mb` is not in flight; a range with the head (it sends nothing forward).
    pub fn output_buffer(&self, mb: u64) -> Result<(Dev<'_, G::Buf>, usize), GpuError> {
        const OP: &str = "GpuGpt::output_buffer";
        if self.range.head {
            return Err(bad(OP, "the head range sends no hidden states".into()));
        }
        let a =
            self.in_flight.get(&mb).ok_or_else(|| bad(OP, format!("microbatch {mb} is not in flight")))?;
        let out = a.layers.last().map_or(&a.input, |l| &l.out);
        Ok((Dev::new(out), a.batch * a.seq * self.cfg.hidden_size))
    }

    /// Keeps the input gradient of the latest backward (of microbatch `mb`) on the device for
    /// sending: one device copy out of the shared scratch, which the next backward overwrites.
    ///
    /// # Errors
    /// No backward has run; a gradient of `mb` already kept; device errors.
    pub fn keep_input_grad(&mut self, mb: u64) -> Result<(), GpuError> {
        const OP: &str = "GpuGpt::keep_input_grad";
        let Some(n) = self.last_backward_n else {
            return Err(bad(OP, "no backward has run".into()));
        };
        if self.messages.outgoing.contains_key(&mb) {
            return Err(bad(OP, format!("the input gradient of microbatch {mb} is kept already")));
        }
        let elems = n * self.cfg.hidden_size;
        let buf = self.message_buffer(elems)?;
        let s = self.scratch.as_ref().ok_or_else(|| bad(OP, "no backward scratch".into()))?;
        self.gpu.copy(Dev::new(&buf), Dev::new(&s.dres), elems * self.dtype.size())?;
        self.messages.outgoing.insert(mb, buf);
        Ok(())
    }

    /// The kept input gradient of `mb` ([`GpuGpt::keep_input_grad`]) and its element count.
    ///
    /// # Errors
    /// None kept for `mb`.
    pub fn kept_input_grad(&self, mb: u64) -> Result<(Dev<'_, G::Buf>, usize), GpuError> {
        let buf = self.messages.outgoing.get(&mb).ok_or_else(|| {
            bad("GpuGpt::kept_input_grad", format!("no input gradient of microbatch {mb} was kept"))
        })?;
        Ok((Dev::new(buf), self.gpu.buf_len(buf) / self.dtype.size()))
    }

    /// Takes the kept input gradient of `mb` ([`GpuGpt::keep_input_grad`]) out of this model
    /// (handed to another stage of the device).
    ///
    /// # Errors
    /// None kept for `mb`.
    pub fn take_kept_input_grad(&mut self, mb: u64) -> Result<G::Buf, GpuError> {
        self.messages.outgoing.remove(&mb).ok_or_else(|| {
            bad("GpuGpt::take_kept_input_grad", format!("no input gradient of microbatch {mb} was kept"))
        })
    }

    /// The kept input gradient of `mb` was queued for sending: its buffer is free once `ready`
    /// (the send's completion) ran.
    pub fn input_grad_sent(&mut self, mb: u64, ready: Option<Ready>) {
        if let Some(buf) = self.messages.outgoing.remove(&mb) {
            self.messages.free.push(Held { buf, ready });
        }
    }

    /// Messages held on the device: arrived and not yet used, and kept and not yet sent.
    pub fn messages_held(&self) -> usize {
        self.messages.inputs.len() + self.messages.douts.len() + self.messages.outgoing.len()
    }
}
