//! One core's UDP socket: batched receives (`recvmmsg`, GRO) and segmented sends (GSO)
//! through `quinn-udp`, with glommio only telling when the socket is readable.
//!
//! Every core binds its own socket to the shared address with `SO_REUSEPORT`, so the
//! kernel spreads connections (by their 4-tuple) over cores and a connection's packets
//! always reach the same core. The socket is non-blocking; `quinn-udp` reads and writes it
//! directly, and a duplicate of its descriptor, owned by glommio, waits for readability on
//! io_uring. A send the kernel refuses for lack of buffer space is dropped and counted:
//! QUIC recovers a lost datagram like any other loss.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{FromRawFd, IntoRawFd};

use anyhow::Context;
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};

/// Datagrams read by one `recvmmsg`.
pub(crate) const RECV_BATCH: usize = 32;

/// Binds `count` sockets to `addr` with `SO_REUSEPORT`: the first fixes the port when
/// `addr` has port 0, the others join it. Each socket asks for `buffer_bytes` of
/// buffer both ways (a kernel limit may give less) and is non-blocking.
pub fn bind_reuseport(addr: SocketAddr, count: usize, buffer_bytes: usize) -> anyhow::Result<Vec<UdpSocket>> {
    let mut sockets = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count {
        let socket =
            Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).context("create socket")?;
        socket.set_reuse_port(true).context("set SO_REUSEPORT")?;
        socket.set_nonblocking(true).context("set O_NONBLOCK")?;
        // A smaller buffer than asked (a kernel limit) is not fatal: QUIC paces itself.
        let _ = socket.set_recv_buffer_size(buffer_bytes);
        let _ = socket.set_send_buffer_size(buffer_bytes);
        socket.bind(&addr.into()).with_context(|| format!("bind {addr}"))?;
        let socket: UdpSocket = socket.into();
        addr = socket.local_addr().context("read the bound address")?;
        sockets.push(socket);
    }
    Ok(sockets)
}

/// Waits until a core's socket is readable; owned by the receive task.
pub(crate) struct Readiness {
    waiter: glommio::net::UdpSocket,
}

impl Readiness {
    /// Waits until a datagram can be read (returns at once if one is waiting).
    pub async fn readable(&self) -> io::Result<()> {
        let mut byte = [0u8; 1];
        self.waiter.peek_from(&mut byte).await.map(|_| ()).map_err(io::Error::from)
    }
}

/// A core's socket: the state `quinn-udp` keeps for it, and receive buffers.
pub(crate) struct Udp {
    socket: UdpSocket,
    state: UdpSocketState,
    buffers: Vec<Vec<u8>>,
    metas: Vec<RecvMeta>,
    /// Datagrams the kernel refused (full send buffer); QUIC retransmits them.
    pub send_dropped: u64,
}

impl Udp {
    /// Takes over a socket bound by [`bind_reuseport`]; must run on the core's executor.
    pub fn new(socket: UdpSocket) -> anyhow::Result<(Udp, Readiness)> {
        let state = UdpSocketState::new(UdpSockRef::from(&socket)).context("prepare the UDP socket")?;
        let duplicate = socket.try_clone().context("duplicate the UDP socket")?;
        // SAFETY: `duplicate` is a freshly duplicated UDP socket descriptor that we own;
        // glommio takes ownership of it and closes it when dropped.
        let waiter = unsafe { glommio::net::UdpSocket::from_raw_fd(duplicate.into_raw_fd()) };
        let buffer_bytes = 64 * 1024;
        let buffers = (0..RECV_BATCH).map(|_| vec![0u8; buffer_bytes]).collect();
        let udp = Udp { socket, state, buffers, metas: vec![RecvMeta::default(); RECV_BATCH], send_dropped: 0 };
        Ok((udp, Readiness { waiter }))
    }

    /// How many datagrams of up to `segment_bytes` one send may carry: at most what the
    /// socket's GSO takes, and no more than fit in [`SEND_BYTES_MAX`]; at least 1.
    pub fn segments_per_send(&self, segment_bytes: usize) -> usize {
        segments_per_send(self.state.max_gso_segments(), segment_bytes)
    }

    /// Reads what is waiting, without blocking: calls `each(meta, bytes)` for every
    /// received buffer (which may hold several datagrams of `meta.stride` bytes each) and
    /// returns how many buffers were read; 0 when nothing was waiting.
    pub fn recv(&mut self, mut each: impl FnMut(&RecvMeta, &[u8])) -> io::Result<usize> {
        // On the stack: this runs for every batch of datagrams.
        let mut buffers = self.buffers.iter_mut();
        let mut slices: [IoSliceMut<'_>; RECV_BATCH] =
            std::array::from_fn(|_| IoSliceMut::new(buffers.next().expect("RECV_BATCH buffers")));
        match self.state.recv(UdpSockRef::from(&self.socket), &mut slices, &mut self.metas) {
            Ok(count) => {
                for (meta, buffer) in self.metas.iter().zip(&self.buffers).take(count) {
                    each(meta, &buffer[..meta.len]);
                }
                Ok(count)
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(error) => Err(error),
        }
    }

    /// Sends one transmit (several datagrams when `segment_size` is set); a full buffer
    /// drops it (counted), other errors are returned. A single datagram too large for the
    /// path (a path MTU probe) is dropped silently, as QUIC expects; a batch too large is
    /// an error, since every datagram in it would be lost.
    pub fn send(&mut self, transmit: &Transmit<'_>) -> io::Result<()> {
        match self.state.try_send(UdpSockRef::from(&self.socket), transmit) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                self.send_dropped += 1;
                Ok(())
            }
            Err(error) if error.raw_os_error() == Some(libc_emsgsize()) && transmit.segment_size.is_none() => Ok(()),
            Err(error) => Err(error),
        }
    }
}

/// The most bytes one send may carry. A GSO send is one UDP datagram until the kernel
/// cuts it into segments, so its length must fit the 16-bit IPv4 total length: 65,535
/// bytes less the 20-byte IPv4 and 8-byte UDP headers. A longer one fails with
/// `EMSGSIZE`, and all of its datagrams are lost.
pub const SEND_BYTES_MAX: usize = 65_535 - 20 - 8;

/// How many datagrams of up to `segment_bytes` one send may carry when the socket's GSO
/// takes `gso_segments`: at most that many, and no more than fit in [`SEND_BYTES_MAX`]; at
/// least 1.
pub fn segments_per_send(gso_segments: usize, segment_bytes: usize) -> usize {
    gso_segments.min(SEND_BYTES_MAX / segment_bytes.max(1)).max(1)
}

/// `EMSGSIZE` on Linux.
const fn libc_emsgsize() -> i32 {
    90
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A send of `segments` datagrams of `segment_bytes` each from `socket` to `to`.
    fn send_batch(
        state: &UdpSocketState,
        socket: &UdpSocket,
        to: SocketAddr,
        segments: usize,
        segment_bytes: usize,
    ) -> io::Result<()> {
        let contents = vec![7u8; segments * segment_bytes];
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents: &contents,
            segment_size: (segments > 1).then_some(segment_bytes),
            src_ip: None,
        };
        state.try_send(UdpSockRef::from(socket), &transmit)
    }

    /// A send never asks for more datagrams than fit in one, whatever their size.
    #[test]
    fn a_send_fits_in_one_datagram_whatever_the_segment_size() {
        for gso in [1, 10, 64, 128] {
            for segment_bytes in [1, 1_200, 1_280, 1_452, 1_500, 9_000, SEND_BYTES_MAX, 65_535] {
                let segments = segments_per_send(gso, segment_bytes);
                assert!(segments >= 1 && segments <= gso, "{gso} x {segment_bytes}: {segments}");
                assert!(
                    segments == 1 || segments * segment_bytes <= SEND_BYTES_MAX,
                    "{gso} x {segment_bytes}: {segments}"
                );
            }
        }
        assert_eq!(segments_per_send(64, 1_200), 54);
    }

    /// On this kernel's loopback, the most datagrams `segments_per_send` allows go out in
    /// one send, and one more fails with `EMSGSIZE`: the limit is the kernel's, not a
    /// guess. (Before it, the server asked for 64 datagrams of 1,200 bytes, and every
    /// such send was lost whole.)
    #[test]
    fn the_kernel_takes_the_largest_send_allowed_and_refuses_one_more_datagram() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let state = UdpSocketState::new(UdpSockRef::from(&socket)).unwrap();
        let gso = state.max_gso_segments();
        assert!(gso > 1, "no GSO on this kernel: the batch limit cannot be checked here");
        let segments = segments_per_send(gso, 1_200);
        send_batch(&state, &socket, receiver.local_addr().unwrap(), segments, 1_200).unwrap();
        let mut byte = [0u8; 1_200];
        assert_eq!(receiver.recv(&mut byte).unwrap(), 1_200);
        if segments < gso {
            let error = send_batch(&state, &socket, receiver.local_addr().unwrap(), segments + 1, 1_200).unwrap_err();
            assert_eq!(error.raw_os_error(), Some(libc_emsgsize()), "{error}");
        }
    }
}
