//! Zero-copy serving of blob bytes on disk on plain-TCP HTTP/1 connections.
//!
//! hyper writes a response body by handing the socket the body's own buffers (vectored
//! writes, no copy), and a blob's chunks on disk are memory mappings of its file
//! (`cache::mapped`). A [`Socket`] asked to write bytes that lie in a mapping lent to it
//! ([`Loans::lend`]) sends those bytes of the file with `sendfile(2)` instead: the kernel moves
//! them from the page cache to the socket, with no copy through regcache's memory and without
//! faulting the mapping in. This is what nginx's `sendfile on` does, kept under hyper, which
//! still owns the protocol (framing, keep-alive, errors).
//!
//! Invariant: a range is on loan only while its mapping exists, and the mapped memory always
//! equals the file's bytes at the recorded offset (committed blobs are never written again, a
//! fill's written part neither: `cache::mapped`).
//! So whatever hyper does with a buffer (writes it whole or in parts, or copies it), sending
//! the file's bytes in place of the memory's is byte-for-byte the same answer. The socket
//! never reads a lent address; it only compares it.

use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::cache::Mapping;

/// The mapped ranges lent to one connection's socket.
pub struct Loans {
    ranges: Mutex<Vec<Loan>>,
    /// Bytes sent with `sendfile` (`regcache_sendfile_bytes_total`).
    sent: prometheus::IntCounter,
    /// Committed blobs are lent too, not only a fill's freshly written bytes
    /// (`config::Sendfile::for_peer`).
    committed: bool,
}

/// One lent range: memory at `addr..addr + len` holds `file`'s bytes from `offset`. Live
/// mappings never share an address, so `addr` names the loan.
struct Loan {
    addr: usize,
    len: usize,
    file: Arc<File>,
    offset: u64,
}

impl Loans {
    pub fn new(sent: prometheus::IntCounter, committed: bool) -> Arc<Loans> {
        Arc::new(Loans {
            ranges: Mutex::new(Vec::new()),
            sent,
            committed,
        })
    }

    /// Whether committed blobs are lent to this connection, not only a fill's written bytes.
    pub fn lends_committed(&self) -> bool {
        self.committed
    }

    /// `map`, `file`'s bytes from `pos` (written, never to change), lent to this connection's
    /// socket until the `Bytes` is dropped. Map it with [`crate::cache::map_in_memory`], so
    /// `sendfile` never waits for the disk on an async thread.
    pub fn lend(self: &Arc<Self>, file: &Arc<File>, pos: u64, map: Mapping) -> Bytes {
        let bytes: &[u8] = map.as_ref();
        let addr = bytes.as_ptr() as usize;
        self.ranges.lock().expect("loans").push(Loan {
            addr,
            len: bytes.len(),
            file: Arc::clone(file),
            offset: pos,
        });
        Bytes::from_owner(Lent {
            _returned: Returned {
                loans: Arc::clone(self),
                addr,
            },
            map,
        })
    }

    /// Where the first buffer in `bufs` that lies wholly in a lent range is: its index, and
    /// the file and offset its bytes are at.
    fn find(&self, bufs: &[IoSlice<'_>]) -> Option<(usize, Arc<File>, u64)> {
        let ranges = self.ranges.lock().expect("loans");
        if ranges.is_empty() {
            return None;
        }
        bufs.iter()
            .enumerate()
            .filter(|(_, b)| !b.is_empty())
            .find_map(|(i, b)| {
                let at = b.as_ptr() as usize;
                ranges
                    .iter()
                    .find(|r| r.addr <= at && at + b.len() <= r.addr + r.len)
                    .map(|r| (i, Arc::clone(&r.file), r.offset + (at - r.addr) as u64))
            })
    }
}

/// A lent mapping, as the owner of the `Bytes` handed to hyper. Fields drop in order: the
/// loan is returned before the memory is unmapped.
struct Lent {
    _returned: Returned,
    map: Mapping,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        self.map.as_ref()
    }
}

/// Takes a range off its connection's loans when dropped.
struct Returned {
    loans: Arc<Loans>,
    addr: usize,
}

impl Drop for Returned {
    fn drop(&mut self) {
        let mut ranges = self.loans.ranges.lock().expect("loans");
        if let Some(i) = ranges.iter().position(|r| r.addr == self.addr) {
            ranges.swap_remove(i);
        }
    }
}

/// A client's TCP stream that sends lent ranges with `sendfile`.
pub struct Socket {
    stream: TcpStream,
    loans: Arc<Loans>,
}

impl Socket {
    pub fn new(stream: TcpStream, loans: Arc<Loans>) -> Socket {
        Socket { stream, loans }
    }

    /// Runs a non-blocking socket call once the socket is writable.
    fn poll_io<R>(
        &self,
        cx: &mut Context<'_>,
        mut call: impl FnMut() -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_io(Interest::WRITABLE, &mut call) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.loans.find(bufs) {
            None => Pin::new(&mut this.stream).poll_write_vectored(cx, bufs),
            Some((0, file, offset)) => {
                let len = bufs[0].len();
                let sent = ready!(this.poll_io(cx, || {
                    let mut at = offset;
                    Ok(rustix::fs::sendfile(
                        &this.stream,
                        &*file,
                        Some(&mut at),
                        len,
                    )?)
                }))?;
                if sent == 0 {
                    // The file ended early: it was damaged under us. Never send anything else
                    // in its place.
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                this.loans.sent.inc_by(sent as u64);
                Poll::Ready(Ok(sent))
            }
            Some((_, _, _)) => {
                // What comes before a lent range (the response head) goes first, marked as
                // not the end of the data, so that it leaves in one segment with the range's
                // first bytes rather than as a small packet of its own.
                let head = &bufs[0];
                this.poll_io(cx, || {
                    Ok(rustix::net::send(
                        &this.stream,
                        head,
                        rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL,
                    )?)
                })
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn counter() -> prometheus::IntCounter {
        prometheus::IntCounter::new("sent", "test").unwrap()
    }

    #[test]
    fn finds_only_buffers_inside_a_lent_range() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; 3 * 4096]).unwrap();
        let file = Arc::new(f);
        let loans = Loans::new(counter(), true);
        let lent = loans.lend(&file, 100, Mapping::new(&file, 100, 8000).unwrap());
        let other = vec![7u8; 8000];
        let found = |bufs: &[IoSlice<'_>]| loans.find(bufs).map(|(i, _, off)| (i, off));
        assert_eq!(found(&[IoSlice::new(&lent)]), Some((0, 100)));
        assert_eq!(found(&[IoSlice::new(&lent[10..20])]), Some((0, 110)));
        assert_eq!(
            found(&[IoSlice::new(&other), IoSlice::new(&lent[5..])]),
            Some((1, 105))
        );
        assert_eq!(found(&[IoSlice::new(&other)]), None);
        // A dropped chunk is returned: its address range means nothing any more.
        drop(lent);
        assert!(loans.ranges.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn lent_bytes_arrive_as_written() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 31 % 253) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let file = Arc::new(f);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let (stream, _) = listener.accept().await.unwrap();
        let loans = Loans::new(counter(), true);
        let mut socket = Socket::new(stream, Arc::clone(&loans));
        let lent = loans.lend(&file, 1000, Mapping::new(&file, 1000, 900_000).unwrap());
        let mut head = b"head:".to_vec();
        head.extend_from_slice(&lent[..10]);
        let mut bufs = [IoSlice::new(&head), IoSlice::new(&lent[10..])];
        let mut bufs = &mut bufs[..];
        while !bufs.is_empty() {
            let n = socket.write_vectored(bufs).await.unwrap();
            IoSlice::advance_slices(&mut bufs, n);
        }
        socket.shutdown().await.unwrap();
        let got = reader.await.unwrap();
        assert_eq!(&got[..5], b"head:");
        assert_eq!(&got[5..], &data[1000..901_000]);
        assert_eq!(loans.sent.get(), 900_000 - 10);
    }
}
