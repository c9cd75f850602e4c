//! Malformed and out-of-range input: NBD requests get their error reply or a clean disconnect (never a
//! write outside the volume), bad handshakes are refused, and the secondary refuses malformed frames.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::*;
use futures::{SinkExt, StreamExt};
use lockstep_replicator::nbd::proto;
use lockstep_replicator::secondary::{Secondary, SecondaryConfig};
use lockstep_replicator::wire::{Frame, FrameCodec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Encoder, Framed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_and_unknown_requests_get_errors() {
    let pair = start_pair(&[("vol1", MIB)], false, Duration::from_secs(30)).await;
    let mut c = RawClient::connect(pair.nbd_addr(), "vol1").await;
    assert_eq!(c.size, MIB);

    // A write past the end: ENOSPC, payload skipped, connection still usable, file not grown.
    assert_eq!(c.write(MIB - 512, &[0xee; 1024]).await, Some(proto::ENOSPC));
    assert_eq!(
        c.write(u64::MAX - 100, &[0xee; 512]).await,
        Some(proto::ENOSPC)
    );
    // Reads and trims past the end: EINVAL.
    assert_eq!(c.read(MIB, 1).await.unwrap().error, proto::EINVAL);
    assert_eq!(
        c.read(0, proto::MAX_PAYLOAD + 1).await.unwrap().error,
        proto::EINVAL
    );
    let r = c
        .request(proto::CMD_TRIM, 0, MIB - 1, 2, &[])
        .await
        .unwrap();
    assert_eq!(r.error, proto::EINVAL);
    // Unknown command and unknown flags: EINVAL.
    assert_eq!(
        c.request(42, 0, 0, 0, &[]).await.unwrap().error,
        proto::EINVAL
    );
    assert_eq!(
        c.request(proto::CMD_WRITE, 0x80, 0, 4, &[1, 2, 3, 4])
            .await
            .unwrap()
            .error,
        proto::EINVAL
    );
    // Still serving: a good write and read round-trip, and the zero-length edge cases succeed.
    assert_eq!(c.write(MIB - 4, &[7, 7, 7, 7]).await, Some(0));
    assert_eq!(c.read(MIB - 4, 4).await.unwrap().data, vec![7, 7, 7, 7]);
    assert_eq!(c.write(MIB, &[]).await, Some(0));
    assert_eq!(
        c.request(proto::CMD_FLUSH, 0, 0, 0, &[])
            .await
            .unwrap()
            .error,
        0
    );
    for path in [pair.primary_file("vol1"), pair.secondary_file("vol1")] {
        assert_eq!(std::fs::metadata(&path).unwrap().len(), MIB, "{path:?}");
    }
    // Disconnect: the server closes cleanly.
    c.stream
        .write_all(&proto::encode_request_header(&proto::RequestHeader {
            flags: 0,
            command: proto::CMD_DISC,
            cookie: 1,
            offset: 0,
            length: 0,
        }))
        .await
        .unwrap();
    assert!(c.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrustworthy_streams_are_disconnected() {
    let pair = start_pair(&[("vol1", MIB)], false, Duration::from_secs(30)).await;
    // A write announcing a payload larger than the maximum.
    let mut c = RawClient::connect(pair.nbd_addr(), "vol1").await;
    let h = proto::encode_request_header(&proto::RequestHeader {
        flags: 0,
        command: proto::CMD_WRITE,
        cookie: 9,
        offset: 0,
        length: u32::MAX,
    });
    c.stream.write_all(&h).await.unwrap();
    assert!(c.closed().await);
    // A bad request magic.
    let mut c = RawClient::connect(pair.nbd_addr(), "vol1").await;
    c.stream
        .write_all(&[0x55; proto::REQUEST_LEN])
        .await
        .unwrap();
    assert!(c.closed().await);
    // Garbage client flags in the handshake.
    let mut s = TcpStream::connect(pair.nbd_addr()).await.unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    s.write_all(&0xffff_ffffu32.to_be_bytes()).await.unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).await.unwrap_or(0), 0);
    // An option with a bad magic, and one with a huge length.
    for header in [
        [0x11u8; 16].to_vec(),
        proto::encode_option_header(&proto::OptionHeader {
            option: proto::OPT_GO,
            length: u32::MAX,
        })
        .to_vec(),
    ] {
        let mut s = RawClient::greet(pair.nbd_addr()).await;
        s.write_all(&header).await.unwrap();
        assert_eq!(s.read(&mut b).await.unwrap_or(0), 0);
    }
    // Nothing was written.
    assert!(
        read_file_at(&pair.primary_file("vol1"), 0, 4096)
            .iter()
            .all(|&x| x == 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_haggling_answers_list_info_errors_and_abort() {
    let pair = start_pair(
        &[("vol1", MIB), ("vol2", 2 * MIB)],
        false,
        Duration::from_secs(30),
    )
    .await;
    let mut s = RawClient::greet(pair.nbd_addr()).await;
    send_option(&mut s, proto::OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let (t, data) = read_option_reply(&mut s).await;
        if t == proto::REP_ACK {
            break;
        }
        assert_eq!(t, proto::REP_SERVER);
        names.push(String::from_utf8(data[4..].to_vec()).unwrap());
    }
    assert_eq!(names, ["vol1", "vol2"]);
    send_option(&mut s, proto::OPT_LIST, b"x").await;
    assert_eq!(read_option_reply(&mut s).await.0, proto::REP_ERR_INVALID);
    // INFO on vol2: its size, then ACK; the session stays in option haggling.
    let info = proto::encode_info_request(&proto::InfoRequest {
        name: "vol2".into(),
        items: vec![],
    });
    send_option(&mut s, proto::OPT_INFO, &info).await;
    let (t, data) = read_option_reply(&mut s).await;
    assert_eq!(t, proto::REP_INFO);
    assert_eq!(data, proto::info_export(2 * MIB, proto::TX_FLAGS));
    assert_eq!(read_option_reply(&mut s).await.0, proto::REP_ACK);
    // Malformed INFO, unknown export, the default export with two exports, an unsupported option.
    send_option(&mut s, proto::OPT_INFO, &[0, 0, 0, 9, b'a']).await;
    assert_eq!(read_option_reply(&mut s).await.0, proto::REP_ERR_INVALID);
    let unknown = proto::encode_info_request(&proto::InfoRequest {
        name: "nope".into(),
        items: vec![],
    });
    send_option(&mut s, proto::OPT_GO, &unknown).await;
    assert_eq!(read_option_reply(&mut s).await.0, proto::REP_ERR_UNKNOWN);
    let default = proto::encode_info_request(&proto::InfoRequest {
        name: String::new(),
        items: vec![],
    });
    send_option(&mut s, proto::OPT_GO, &default).await;
    assert_eq!(read_option_reply(&mut s).await.0, proto::REP_ERR_UNKNOWN);
    send_option(&mut s, 8, &[]).await; // STRUCTURED_REPLY: not offered.
    assert_eq!(read_option_reply(&mut s).await.0, proto::REP_ERR_UNSUP);
    // EXPORT_NAME still works after all that.
    send_option(&mut s, proto::OPT_EXPORT_NAME, b"vol1").await;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(
        reply.to_vec(),
        proto::export_name_reply(MIB, proto::TX_FLAGS, true)
    );
    // ABORT: acknowledged, then closed.
    let mut s = RawClient::greet(pair.nbd_addr()).await;
    send_option(&mut s, proto::OPT_ABORT, &[]).await;
    assert_eq!(read_option_reply(&mut s).await.0, proto::REP_ACK);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).await.unwrap_or(0), 0);
}

async fn secondary() -> (tempfile::TempDir, Secondary) {
    let dir = tempfile::tempdir().unwrap();
    let s = Secondary::start(SecondaryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        dir: dir.path().join("sec"),
        security: lockstep_replicator::LinkSecurity::Plaintext,
    })
    .await
    .unwrap();
    (dir, s)
}

async fn expect_error_then_close(link: &mut Framed<TcpStream, FrameCodec>) -> String {
    let msg = match tokio::time::timeout(Duration::from_secs(10), link.next())
        .await
        .unwrap()
    {
        Some(Ok(Frame::Error { message, .. })) => message,
        other => panic!("expected an error frame, got {other:?}"),
    };
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(10), link.next())
            .await
            .unwrap(),
        None | Some(Err(_))
    ));
    msg
}

async fn hello(
    addr: std::net::SocketAddr,
    volume: &str,
    size: u64,
) -> Framed<TcpStream, FrameCodec> {
    let mut link = Framed::new(TcpStream::connect(addr).await.unwrap(), FrameCodec);
    link.send(Frame::Hello {
        volume: volume.into(),
        size,
        first_seq: 10,
        keep: None,
        drop_image: None,
    })
    .await
    .unwrap();
    assert_eq!(
        link.next().await.unwrap().unwrap(),
        Frame::Welcome {
            next_seq: 10,
            kept: None
        }
    );
    link
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_refuses_malformed_frames() {
    let (dir, sec) = secondary().await;
    let addr = sec.local_addr();

    // Garbage instead of a hello.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(&[0xde; 64]).await.unwrap();
    let mut link = Framed::new(raw, FrameCodec);
    let msg = expect_error_then_close(&mut link).await;
    assert!(msg.contains("magic"), "{msg}");

    // A hello naming a path outside the directory.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    let mut buf = BytesMut::new();
    FrameCodec.encode(&Frame::Ack { seq: 0 }, &mut buf).unwrap();
    buf[4] = 1; // kind HELLO
    buf[27] = 5; // name length
    buf.extend_from_slice(b"../xx");
    raw.write_all(&buf).await.unwrap();
    let mut link = Framed::new(raw, FrameCodec);
    expect_error_then_close(&mut link).await;
    assert!(!dir.path().join("xx").exists());

    // Out-of-range write, out-of-order sequence, a frame only a secondary sends.
    let mut link = hello(addr, "v", 8192).await;
    link.send(Frame::Write {
        seq: 10,
        offset: 0,
        data: vec![1u8; 4096].into(),
    })
    .await
    .unwrap();
    assert_eq!(link.next().await.unwrap().unwrap(), Frame::Ack { seq: 10 });
    link.send(Frame::Write {
        seq: 11,
        offset: 8000,
        data: vec![2u8; 4096].into(),
    })
    .await
    .unwrap();
    let msg = expect_error_then_close(&mut link).await;
    assert!(msg.contains("outside"), "{msg}");

    let mut link = hello(addr, "v", 8192).await;
    link.send(Frame::Write {
        seq: 12,
        offset: 0,
        data: vec![3u8; 16].into(),
    })
    .await
    .unwrap();
    let msg = expect_error_then_close(&mut link).await;
    assert!(msg.contains("out of order"), "{msg}");

    let mut link = hello(addr, "v", 8192).await;
    link.send(Frame::Ack { seq: 10 }).await.unwrap();
    expect_error_then_close(&mut link).await;

    // Only the one good write landed, and the file kept its size.
    let f = dir.path().join("sec").join("v");
    assert_eq!(std::fs::metadata(&f).unwrap().len(), 8192);
    assert!(read_file_at(&f, 0, 4096).iter().all(|&b| b == 1));
    assert!(read_file_at(&f, 4096, 4096).iter().all(|&b| b == 0));
}
