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

    /// How many datagrams one send may carry (GSO), at least 1.
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
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
    /// drops it (counted), other errors are returned.
    pub fn send(&mut self, transmit: &Transmit<'_>) -> io::Result<()> {
        match self.state.try_send(UdpSockRef::from(&self.socket), transmit) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                self.send_dropped += 1;
                Ok(())
            }
            // Path MTU probes larger than the path allows fail like this; QUIC expects it.
            Err(error) if error.raw_os_error() == Some(libc_emsgsize()) => Ok(()),
            Err(error) => Err(error),
        }
    }
}

/// `EMSGSIZE` on Linux.
const fn libc_emsgsize() -> i32 {
    90
}
