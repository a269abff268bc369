//! `TcpState`'s versioned, bounded byte encoding for the control channel.

use super::*;

/// Checks what [`TcpState::decode`] would refuse; `encode` and `rebuild` call it too.
pub(super) fn check_bounds(state: &TcpState) -> Result<(), RepairError> {
    if state.send_queue.len() > MAX_QUEUE_BYTES {
        return Err(RepairError::QueueTooLarge {
            queue: "send",
            len: state.send_queue.len(),
        });
    }
    if state.recv_queue.len() > MAX_QUEUE_BYTES {
        return Err(RepairError::QueueTooLarge {
            queue: "recv",
            len: state.recv_queue.len(),
        });
    }
    if state.unsent_len as usize > state.send_queue.len() {
        return Err(RepairError::Decode("unsent length over the send queue"));
    }
    if state.snd_wscale > TCP_MAX_WSCALE || state.rcv_wscale > TCP_MAX_WSCALE {
        return Err(RepairError::Decode("window scale over 14"));
    }
    if state.local.is_ipv4() != state.peer.is_ipv4() {
        return Err(RepairError::Decode(
            "local and peer address families differ",
        ));
    }
    Ok(())
}

impl TcpState {
    /// The control channel's byte form. All integers big-endian; version 1:
    ///
    /// | bytes | field |
    /// |---|---|
    /// | 1 | version = 1 |
    /// | 1 | flags: bit 0 SACK, bit 1 timestamps, bit 2 window scaling; others 0 |
    /// | 1, 1 | `snd_wscale`, `rcv_wscale` (≤ 14) |
    /// | 4, 4 | `mss`, `timestamp` |
    /// | 4, 4 | `send_seq`, `recv_seq` |
    /// | 5 × 4 | window: `snd_wl1`, `snd_wnd`, `max_window`, `rcv_wnd`, `rcv_wup` |
    /// | 7 or 23 | local address: family 4 then 4 address bytes and port (2), or family 6 then 16 address bytes, port (2) and scope id (4) |
    /// | 7 or 23 | peer address, the same way (same family) |
    /// | 4 | `unsent_len` (≤ send queue length) |
    /// | 4 + n | send queue: length n (≤ [`MAX_QUEUE_BYTES`]), bytes |
    /// | 4 + m | receive queue: length m (≤ [`MAX_QUEUE_BYTES`]), bytes |
    ///
    /// Nothing follows. Fails only on a state [`TcpState::decode`] would refuse.
    pub fn encode(&self) -> Result<Vec<u8>, RepairError> {
        check_bounds(self)?;
        let mut out = Vec::with_capacity(96 + self.send_queue.len() + self.recv_queue.len());
        let mut flags = 0;
        if self.sack_ok {
            flags |= FLAG_SACK;
        }
        if self.timestamps_ok {
            flags |= FLAG_TIMESTAMPS;
        }
        if self.wscale_ok {
            flags |= FLAG_WSCALE;
        }
        out.extend_from_slice(&[FORMAT_VERSION, flags, self.snd_wscale, self.rcv_wscale]);
        for v in [
            self.mss,
            self.timestamp,
            self.send_seq,
            self.recv_seq,
            self.window.snd_wl1,
            self.window.snd_wnd,
            self.window.max_window,
            self.window.rcv_wnd,
            self.window.rcv_wup,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        encode_addr(&mut out, self.local);
        encode_addr(&mut out, self.peer);
        out.extend_from_slice(&self.unsent_len.to_be_bytes());
        for queue in [&self.send_queue, &self.recv_queue] {
            // Bounded above (64 MiB < u32::MAX).
            out.extend_from_slice(&(queue.len() as u32).to_be_bytes());
            out.extend_from_slice(queue);
        }
        Ok(out)
    }

    /// Parses what [`TcpState::encode`] wrote, refusing another version, unknown flags, a
    /// window scale over 14, an unknown address family, mixed families, a queue over
    /// [`MAX_QUEUE_BYTES`], truncation and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<TcpState, RepairError> {
        let mut r = Reader { rest: bytes };
        let version = r.u8()?;
        if version != FORMAT_VERSION {
            return Err(RepairError::Version(version));
        }
        let flags = r.u8()?;
        if flags & !(FLAG_SACK | FLAG_TIMESTAMPS | FLAG_WSCALE) != 0 {
            return Err(RepairError::Decode("unknown flags"));
        }
        let snd_wscale = r.u8()?;
        let rcv_wscale = r.u8()?;
        let mss = r.u32()?;
        let timestamp = r.u32()?;
        let send_seq = r.u32()?;
        let recv_seq = r.u32()?;
        let window = TcpWindow {
            snd_wl1: r.u32()?,
            snd_wnd: r.u32()?,
            max_window: r.u32()?,
            rcv_wnd: r.u32()?,
            rcv_wup: r.u32()?,
        };
        let local = r.addr()?;
        let peer = r.addr()?;
        let unsent_len = r.u32()?;
        let send_queue = r.queue("send")?;
        let recv_queue = r.queue("recv")?;
        if !r.rest.is_empty() {
            return Err(RepairError::Decode("trailing bytes"));
        }
        let state = TcpState {
            local,
            peer,
            send_seq,
            recv_seq,
            send_queue,
            unsent_len,
            recv_queue,
            mss,
            wscale_ok: flags & FLAG_WSCALE != 0,
            snd_wscale,
            rcv_wscale,
            sack_ok: flags & FLAG_SACK != 0,
            timestamps_ok: flags & FLAG_TIMESTAMPS != 0,
            timestamp,
            window,
        };
        check_bounds(&state)?;
        Ok(state)
    }
}

fn encode_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        SocketAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
            out.extend_from_slice(&a.scope_id().to_be_bytes());
        }
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], RepairError> {
        if self.rest.len() < n {
            return Err(RepairError::Decode("truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RepairError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, RepairError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, RepairError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, RepairError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn addr(&mut self) -> Result<SocketAddr, RepairError> {
        match self.u8()? {
            4 => {
                let ip = Ipv4Addr::from(self.array::<4>()?);
                let port = self.u16()?;
                Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)))
            }
            6 => {
                let ip = Ipv6Addr::from(self.array::<16>()?);
                let port = self.u16()?;
                let scope = self.u32()?;
                Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope)))
            }
            _ => Err(RepairError::Decode("unknown address family")),
        }
    }

    fn queue(&mut self, queue: &'static str) -> Result<Vec<u8>, RepairError> {
        let len = self.u32()? as usize;
        if len > MAX_QUEUE_BYTES {
            return Err(RepairError::QueueTooLarge { queue, len });
        }
        Ok(self.take(len)?.to_vec())
    }
}
