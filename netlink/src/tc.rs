//! tc: the ingress qdisc and a catch-all redirect filter, the plumbing that
//! joins a pod's veth and the VM's tap (each one's ingress goes out of the
//! other, for every protocol), as Kata's "tcfilter" mode does.
//!
//! Contract:
//! - `add_ingress_qdisc`: `tc qdisc add dev X ingress` (handle ffff:);
//!   EEXIST if there is one.
//! - `delete_ingress_qdisc`: removes it with its filters; `Ok(false)` if
//!   there was none.
//! - `has_ingress_qdisc`: from a qdisc dump.
//! - `redirect_ingress(from, to)`: on `from`'s ingress qdisc (which must
//!   exist), one catch-all filter, protocol all, priority 1, handle
//!   800::800, whose only action is `mirred egress redirect dev to`: what
//!   `tc filter add dev FROM parent ffff: protocol all prio 1 handle
//!   800::800 u32 match u8 0 0 action mirred egress redirect dev TO` does.
//!   A second call on the same `from` is EEXIST (the fixed handle).
//!
//! The classifier is `u32` with one key that masks nothing (matches every
//! frame), as Kata and tc-redirect-tap use, not `matchall`, although
//! netlink-packet-route models both: `matchall` (CONFIG_NET_CLS_MATCHALL)
//! is missing from kernels this runs on (the test machine's answers "TC
//! classifier not found"), while `u32` is everywhere tc is.

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption,
    TcActionOption, TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage,
    TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;

use crate::{Error, Netlink};

const INGRESS_KIND: &str = "ingress";
/// The ingress qdisc's own handle, ffff:0: filters hang under it.
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};
/// Filter priority of the redirect: fixed, so a second redirect on the
/// same link is refused (EEXIST) instead of stacking silently.
const REDIRECT_PRIO: u32 = 1;
/// u32 handle 800::800: hash table 0x800 (the one u32 makes by default),
/// bucket 0, node 0x800. Fixed so that `NLM_F_EXCL` catches a duplicate.
const REDIRECT_HANDLE: TcHandle = TcHandle {
    major: 0x8000,
    minor: 0x0800,
};
/// ETH_P_ALL: the filter sees every protocol.
const ETH_P_ALL: u16 = 0x0003;

impl Netlink {
    /// `tc qdisc add dev INDEX ingress`.
    pub fn add_ingress_qdisc(&mut self, index: u32) -> Result<(), Error> {
        let op = format!("adding an ingress qdisc to link {index}");
        let mut msg = tc_message(&op, index)?;
        msg.header.parent = TcHandle::INGRESS;
        msg.header.handle = INGRESS_HANDLE;
        msg.attributes
            .push(TcAttribute::Kind(INGRESS_KIND.to_string()));
        self.request(
            &op,
            RouteNetlinkMessage::NewQueueDiscipline(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// `tc qdisc del dev INDEX ingress`; false if there was none.
    pub fn delete_ingress_qdisc(&mut self, index: u32) -> Result<bool, Error> {
        let op = format!("deleting the ingress qdisc of link {index}");
        let mut msg = tc_message(&op, index)?;
        msg.header.parent = TcHandle::INGRESS;
        // Handle 0: the kernel takes whatever sits at the ingress parent and
        // answers ENOENT both when there never was an ingress qdisc and when
        // only the noop placeholder is left after a delete (both tested).
        // With handle ffff: the second case is EINVAL "Invalid handle" in
        // tc_get_qdisc, indistinguishable from a real error.
        match self.request(&op, RouteNetlinkMessage::DelQueueDiscipline(msg), 0) {
            Ok(_) => Ok(true),
            Err(Error::Kernel { errno, .. }) if errno == libc::ENOENT => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether link `index` has an ingress qdisc.
    pub fn has_ingress_qdisc(&mut self, index: u32) -> Result<bool, Error> {
        let op = format!("listing the qdiscs of link {index}");
        let want = tc_message(&op, index)?.header.index;
        let replies = self.dump(
            &op,
            RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
        )?;
        Ok(replies.iter().any(|reply| {
            matches!(reply, RouteNetlinkMessage::NewQueueDiscipline(m)
                if m.header.index == want
                    && m.attributes.iter().any(|a| matches!(a, TcAttribute::Kind(k) if k == INGRESS_KIND)))
        }))
    }

    /// On `from`'s ingress, every frame (all protocols) is redirected to
    /// `to`'s egress. Needs `add_ingress_qdisc(from)` first.
    pub fn redirect_ingress(&mut self, from: u32, to: u32) -> Result<(), Error> {
        let op = format!("redirecting the ingress of link {from} to the egress of link {to}");
        let mut msg = tc_message(&op, from)?;
        msg.header.parent = INGRESS_HANDLE;
        msg.header.handle = REDIRECT_HANDLE;
        // tcm_info of a filter: priority in the upper 16 bits, protocol (in
        // network byte order) in the lower.
        msg.header.info = (REDIRECT_PRIO << 16) | u32::from(ETH_P_ALL.to_be());

        let mut mirred = TcMirror::default();
        mirred.eaction = TcMirrorActionType::EgressRedir;
        mirred.ifindex = to;
        let mut generic = TcActionGeneric::default();
        // What `mirred … redirect` sets: the frame is consumed here.
        generic.action = TcActionType::Stolen;
        mirred.generic = generic;

        let mut action = TcAction::default();
        action.attributes = vec![
            TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
                mirred,
            ))]),
        ];
        // `match u8 0 0`: one key, mask 0, so every frame matches;
        // terminal: the actions run on a match.
        let mut selector = TcU32Selector::default();
        selector.flags = TcU32SelectorFlags::Terminal;
        selector.keys = vec![TcU32Key::default()];
        selector.nkeys = 1;
        msg.attributes
            .push(TcAttribute::Kind(TcFilterU32::KIND.to_string()));
        msg.attributes.push(TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(selector)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]));
        self.request(
            &op,
            RouteNetlinkMessage::NewTrafficFilter(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }
}

/// A tc message for link `index` (tcm_ifindex is a signed int).
fn tc_message(op: &str, index: u32) -> Result<TcMessage, Error> {
    let index = i32::try_from(index).map_err(|_| Error::Invalid {
        op: op.to_string(),
        reason: format!("link index {index} out of range"),
    })?;
    Ok(TcMessage::with_index(index))
}
