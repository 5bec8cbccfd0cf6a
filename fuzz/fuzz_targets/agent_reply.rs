//! What the shim does with bytes from the agent's control connection: the
//! ttrpc frames (10-byte header, length limit), the ttrpc `Response`, the
//! reply messages of the calls the shim makes, and the event log cursor
//! (`thaw_agent_protocol::events`), whose promises are checked here:
//! every sequence number is handed out once, in order, and the cursor never
//! moves back.

#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_agent_protocol::agent;
use thaw_agent_protocol::events::EventCursor;
use thaw_agent_protocol::protobuf::Message;
use thaw_agent_protocol::ttrpc::proto::{
    Codec, MessageHeader, Response, MESSAGE_HEADER_LENGTH, MESSAGE_LENGTH_MAX,
    MESSAGE_TYPE_RESPONSE,
};
use thaw_agent_protocol::ttrpc::Code;
use thaw_agent_protocol::PROTOCOL_VERSION;

/// Decode `payload` as the reply of the call on `stream`, the way the
/// generated client does, and look at what the shim looks at.
fn reply(stream: u32, payload: &[u8], cursor: &mut EventCursor) {
    match stream % 8 {
        0 => {
            if let Ok(h) = agent::HealthResponse::parse_from_bytes(payload) {
                let _ = h.protocol_version == PROTOCOL_VERSION;
                let _ = h.agent_version.len();
            }
        }
        1 => {
            let _ = agent::CreateContainerResponse::parse_from_bytes(payload).map(|r| r.pid);
        }
        2 => {
            let _ = agent::WaitProcessResponse::parse_from_bytes(payload);
        }
        3 => {
            let _ = agent::StatsResponse::parse_from_bytes(payload);
        }
        4 => {
            let _ = agent::ListPidsResponse::parse_from_bytes(payload);
        }
        5 => {
            let _ = agent::Empty::parse_from_bytes(payload);
        }
        _ => {
            let Ok(r) = agent::GetEventsResponse::parse_from_bytes(payload) else {
                return;
            };
            let before = cursor.after();
            let new = cursor.take(&r);
            let mut last = before;
            for e in &new.events {
                assert!(e.seq > last, "event {} handed out after {last}", e.seq);
                last = e.seq;
            }
            assert_eq!(cursor.after(), last, "cursor is not at the last event");
            assert!(cursor.after() >= before, "cursor moved back");
            if let Some((from, to)) = new.missed {
                assert!(from < to, "empty gap {from}..{to}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut cursor = EventCursor::new();
    let mut rest = data;
    while rest.len() >= MESSAGE_HEADER_LENGTH {
        let mh = MessageHeader::from(&rest[..MESSAGE_HEADER_LENGTH]);
        rest = &rest[MESSAGE_HEADER_LENGTH..];
        let len = mh.length as usize;
        // The client discards oversized frames without reading them in.
        if len > MESSAGE_LENGTH_MAX {
            rest = &rest[len.min(rest.len())..];
            continue;
        }
        let Some(body) = rest.get(..len) else {
            return;
        };
        rest = &rest[len..];
        if mh.type_ != MESSAGE_TYPE_RESPONSE {
            continue;
        }
        let Ok(res) = Response::decode(body) else {
            continue;
        };
        if res.status().code() != Code::OK {
            let _ = res.status().message().len();
            continue;
        }
        reply(mh.stream_id, &res.payload, &mut cursor);
    }
});
