//! Serving calls (`spec/11-rpc.md`): replies to guests' requests, addressed to the
//! requesting guest incarnation and carrying the request's correlation id.

use std::time::Duration;

use shm_primitives::view::SlotBytes;

use crate::{HostLoan, Meta, MsgKind, Received, SendError, ShmHost};

/// Why a reply was not sent. Nothing was published.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// The message replied to is not a request (`shm.rpc.reply`).
    #[error("cannot reply to a message of kind {0:?}: only requests are answered")]
    NotRequest(MsgKind),
    /// The send failed (back-pressure, a stale handle, a guest gone or fenced, ...).
    #[error(transparent)]
    Send(#[from] SendError),
}

impl ReplyError {
    /// True for the back-pressure errors a caller should retry.
    pub fn is_would_block(&self) -> bool {
        matches!(self, ReplyError::Send(e) if e.is_would_block())
    }
}

impl Received {
    /// True for a request: a message that expects one [`reply`](ShmHost::reply).
    pub fn is_request(&self) -> bool {
        self.meta.kind == MsgKind::Request
    }

    /// True for a cancel: the guest gave up on its call with id `meta.user_id`.
    pub fn is_cancel(&self) -> bool {
        self.meta.kind == MsgKind::Cancel
    }

    /// The header of a response to this request: kind Response, the request's
    /// `msg_type` and correlation id (`shm.rpc.correlate`). For replies sent by other
    /// means (an [`AsyncHost`](crate::AsyncHost) or a plain [`HostLoan`]); send them to
    /// [`handle`](Self::handle).
    pub fn response_meta(&self) -> Meta {
        self.meta.with_kind(MsgKind::Response)
    }

    /// The response header, if this is a request.
    fn reply_meta(&self) -> Result<Meta, ReplyError> {
        match self.meta.kind {
            MsgKind::Request => Ok(self.response_meta()),
            other => Err(ReplyError::NotRequest(other)),
        }
    }
}

impl ShmHost {
    /// Answers `request` with `payload`, waiting up to `timeout` for ring space and a
    /// slot as [`send`](Self::send) does. The response goes to the guest incarnation
    /// that sent the request, never to a later guest of the same entry (then it fails
    /// with [`SendError::Stale`]).
    // shm[impl shm.rpc.reply]
    // shm[impl shm.rpc.correlate]
    pub fn reply(
        &mut self,
        request: &Received,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(), ReplyError> {
        let meta = request.reply_meta()?;
        Ok(self.send(request.handle(), meta, payload, timeout)?)
    }

    /// [`reply`](Self::reply) without waiting: a full ring or pool is a would-block
    /// error and nothing is sent.
    // shm[impl shm.rpc.reply]
    pub fn try_reply(&mut self, request: &Received, payload: &[u8]) -> Result<(), ReplyError> {
        let meta = request.reply_meta()?;
        Ok(self.try_send(request.handle(), meta, payload)?)
    }

    /// Loans a slot of at least `len` bytes for the response to `request`, to be
    /// written in place and sent with [`ReplyLoan::send`] (`shm.slot.loan`). Never
    /// blocks.
    // shm[impl shm.rpc.reply]
    pub fn loan_reply(
        &mut self,
        request: &Received,
        len: usize,
    ) -> Result<ReplyLoan<'_>, ReplyError> {
        let meta = request.reply_meta()?;
        let loan = self.loan(request.handle(), len)?;
        Ok(ReplyLoan { loan, meta })
    }
}

/// A slot loaned for a response ([`ShmHost::loan_reply`]); dropping it unsent returns
/// the slot.
#[derive(Debug)]
pub struct ReplyLoan<'h> {
    loan: HostLoan<'h>,
    meta: Meta,
}

impl ReplyLoan<'_> {
    /// Sends the first `len` bytes of the slot as the response.
    pub fn send(self, len: usize) -> Result<(), ReplyError> {
        Ok(self.loan.send(self.meta, len)?)
    }
}

impl std::ops::Deref for ReplyLoan<'_> {
    type Target = SlotBytes;
    fn deref(&self) -> &SlotBytes {
        &self.loan
    }
}

impl std::ops::DerefMut for ReplyLoan<'_> {
    fn deref_mut(&mut self) -> &mut SlotBytes {
        &mut self.loan
    }
}

#[cfg(feature = "tokio")]
impl crate::AsyncHost {
    /// Answers `request` with `payload`, waiting for ring space and a slot as long as
    /// it takes ([`ShmHost::reply`] otherwise).
    // shm[impl shm.rpc.reply]
    pub async fn reply(&mut self, request: &Received, payload: &[u8]) -> Result<(), ReplyError> {
        let meta = request.reply_meta()?;
        Ok(self.send(request.handle(), meta, payload).await?)
    }
}
