//! Lanes carry the IPv6 flow labels asked for: checked on the wire by sniffing the loopback
//! interface (needs CAP_NET_RAW; skipped with a note without it).

mod common;

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use accl_core::{ReduceOp, TransportKind};
use common::{run_ranks, test_config};

const ETH_P_IPV6: u16 = 0x86DD;

/// A raw packet socket on `lo` that sees every IPv6 frame, or None without privileges.
fn sniffer() -> Option<OwnedFd> {
    // SAFETY: plain socket/bind calls with valid arguments.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (ETH_P_IPV6).to_be() as i32);
        if fd < 0 {
            return None;
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_IPV6.to_be();
        addr.sll_ifindex = libc::if_nametoindex(c"lo".as_ptr()) as i32;
        let rc = libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        if rc != 0 {
            return None;
        }
        // Room for every frame of the test: frames the counter has not read yet when the queue
        // is full are dropped, and with the ranks busy on the cores it can fall far behind.
        // SO_RCVBUFFORCE passes the system limit (root, as sniffing needs anyway).
        let bytes: libc::c_int = 256 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            let rc = libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                opt,
                &bytes as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
            if rc == 0 {
                break;
            }
        }
        Some(fd)
    }
}

#[test]
fn tcp_lanes_send_their_flow_labels() {
    let base = 0xACC10;
    let lanes = 4;
    let Some(sock) = sniffer() else {
        eprintln!("skipped: no CAP_NET_RAW to sniff lo (the lane labels are still set, only not observed)");
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let counter = std::thread::spawn(move || {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        // SAFETY: valid option for a socket.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let mut seen: BTreeMap<u32, usize> = BTreeMap::new();
        let mut frame = vec![0u8; 65536 + 64];
        // Once the ranks are done: read on until the queue is empty (a receive times out), or
        // for at most 2 s should other traffic keep arriving on lo.
        let mut drain_until = None;
        loop {
            // SAFETY: valid buffer.
            let n = unsafe { libc::recv(fd, frame.as_mut_ptr() as *mut libc::c_void, frame.len(), 0) };
            if stop2.load(Ordering::Relaxed) {
                let until = *drain_until.get_or_insert_with(|| Instant::now() + Duration::from_secs(2));
                if n < 0 || Instant::now() > until {
                    break;
                }
            }
            if n < 14 + 40 {
                continue;
            }
            let ip = &frame[14..n as usize];
            let word = u32::from_be_bytes([ip[0], ip[1], ip[2], ip[3]]);
            let payload_len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            // Data segments (TCP with payload beyond a bare header) only.
            if word >> 28 == 6 && ip[6] == 6 && payload_len > 128 {
                *seen.entry(word & 0xF_FFFF).or_default() += 1;
            }
        }
        seen
    });
    let config = accl_core::Config { flow_label: base, lanes, ..test_config(TransportKind::Tcp) };
    let infos = run_ranks(2, config, |_, mut comm| {
        let mut buf = vec![1.0f32; 1 << 20];
        for _ in 0..3 {
            comm.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
        }
        comm.lane_info()
    });
    stop.store(true, Ordering::Relaxed);
    let seen = counter.join().unwrap();
    for (rank, info) in infos.iter().enumerate() {
        let labels: Vec<u32> = info.iter().map(|l| l.flow_label).collect();
        assert_eq!(labels, (0..lanes as u32).map(|i| base + i).collect::<Vec<_>>(), "rank {rank} lanes");
    }
    eprintln!("data packets by flow label: {seen:x?}");
    for lane in 0..lanes as u32 {
        let n = seen.get(&(base + lane)).copied().unwrap_or(0);
        assert!(n > 0, "no data packet carried flow label {:#x} (seen: {seen:x?})", base + lane);
    }
}
