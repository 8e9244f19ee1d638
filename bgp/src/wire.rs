//! The wire format, through `netgauze-bgp-pkt`: building the messages a VIP-originating
//! speaker sends (OPEN with capabilities, UPDATEs with our attributes, KEEPALIVE,
//! NOTIFICATION), framing, and decoding what peers send with RFC 7606 error handling (a
//! malformed path attribute makes the UPDATE's routes treat-as-withdraw instead of a reset).

use std::collections::HashMap;
use std::io::Cursor;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::capabilities::{
    BgpCapability, FourOctetAsCapability, MultiProtocolExtensionsCapability,
};
use netgauze_bgp_pkt::community::{Community, LargeCommunity};
use netgauze_bgp_pkt::nlri::{Ipv4Unicast, Ipv4UnicastAddress, Ipv6Unicast, Ipv6UnicastAddress};
use netgauze_bgp_pkt::notification::{
    BgpNotificationMessage, MessageHeaderError, OpenMessageError, RouteRefreshError,
    UpdateMessageError,
};
use netgauze_bgp_pkt::open::{BgpOpenMessage, BgpOpenMessageParameter};
use netgauze_bgp_pkt::path_attribute::{
    As4PathSegment, AsPath, AsPathSegmentType, Communities, LargeCommunities, LocalPreference,
    MpReach, MpUnreach, MultiExitDiscriminator, NextHop, Origin, PathAttribute, PathAttributeValue,
};
use netgauze_bgp_pkt::update::BgpUpdateMessage;
use netgauze_bgp_pkt::wire::deserializer::BgpParsingContext;
use netgauze_iana::address_family::AddressType;
use netgauze_parse_utils::WritablePdu;
use netgauze_parse_utils::reader::SliceReader;
use netgauze_parse_utils::traits::ParseFromWithOneInput;

/// RFC 6793: the AS number sent in OPEN's 2-byte field when ours does not fit.
pub const AS_TRANS: u16 = 23456;
/// RFC 4271 §4.1.
pub const HEADER_LEN: usize = 19;
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Prefixes per UPDATE, so a message stays within 4096 bytes with our attributes: a /32 takes 5
/// bytes of NLRI, a /128 17 (500 x 5 and 200 x 17 leave room for the path attributes).
pub const IPV4_PREFIXES_PER_UPDATE: usize = 500;
pub const IPV6_PREFIXES_PER_UPDATE: usize = 200;

pub fn prefixes_per_update(ipv6: bool) -> usize {
    if ipv6 {
        IPV6_PREFIXES_PER_UPDATE
    } else {
        IPV4_PREFIXES_PER_UPDATE
    }
}

/// RFC 8326 GRACEFUL_SHUTDOWN community 65535:0.
pub const GRACEFUL_SHUTDOWN: u32 = 0xffff_0000;

/// Attributes of one originated route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RouteAttrs {
    pub med: Option<u32>,
    /// Extra copies of our AS in the AS_PATH (eBGP).
    pub prepend: u8,
    pub communities: Vec<u32>,
    pub large_communities: Vec<(u32, u32, u32)>,
    /// iBGP only.
    pub local_pref: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("encoding: {0}")]
    Encode(String),
    /// A message RFC 4271 §6 answers with a NOTIFICATION (`None`: close without one, e.g. an
    /// undecodable NOTIFICATION, which is never answered).
    #[error("{detail}")]
    Protocol {
        detail: String,
        notification: Option<BgpNotificationMessage>,
    },
}

impl WireError {
    /// The NOTIFICATION RFC 4271 §6 gives this error, if any.
    pub fn notification(&self) -> Option<BgpNotificationMessage> {
        match self {
            WireError::Protocol { notification, .. } => notification.clone(),
            WireError::Encode(_) => None,
        }
    }
}

fn protocol(detail: impl Into<String>, n: Option<BgpNotificationMessage>) -> WireError {
    WireError::Protocol {
        detail: detail.into(),
        notification: n,
    }
}

fn header_error(detail: String, e: MessageHeaderError) -> WireError {
    protocol(detail, Some(BgpNotificationMessage::MessageHeaderError(e)))
}

fn open_error(detail: String, e: OpenMessageError) -> WireError {
    protocol(detail, Some(BgpNotificationMessage::OpenMessageError(e)))
}

/// Message types (RFC 4271 §4.1, RFC 2918).
const OPEN: u8 = 1;
const UPDATE: u8 = 2;
const NOTIFICATION: u8 = 3;
const KEEPALIVE: u8 = 4;
const ROUTE_REFRESH: u8 = 5;
/// The only BGP version we speak (sent back in an Unsupported Version Number error).
pub const BGP_VERSION: u8 = 4;

pub fn encode(m: &BgpMessage) -> Result<Vec<u8>, WireError> {
    let mut buf = Vec::with_capacity(64);
    m.write(&mut Cursor::new(&mut buf))
        .map_err(|e| WireError::Encode(format!("{e:?}")))?;
    Ok(buf)
}

/// Our OPEN: IPv4 and IPv6 unicast, route refresh, 4-octet AS.
pub fn open(local_as: u32, hold_time_s: u16, router_id: Ipv4Addr) -> BgpMessage {
    let my_as = u16::try_from(local_as).unwrap_or(AS_TRANS);
    BgpMessage::Open(BgpOpenMessage::new(
        my_as,
        hold_time_s,
        router_id,
        [BgpOpenMessageParameter::new_capabilities([
            BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(
                AddressType::Ipv4Unicast,
            )),
            BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(
                AddressType::Ipv6Unicast,
            )),
            BgpCapability::RouteRefresh,
            BgpCapability::FourOctetAs(FourOctetAsCapability::new(local_as)),
        ])],
    ))
}

/// What we learn from a peer's OPEN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOpen {
    pub asn: u32,
    pub hold_time_s: u16,
    pub router_id: Ipv4Addr,
    pub asn4: bool,
    /// The peer takes IPv4 unicast routes (announced, or no multiprotocol capability at all:
    /// RFC 4760 §8).
    pub ipv4_unicast: bool,
    /// The peer announced the IPv6 unicast capability.
    pub ipv6_unicast: bool,
}

pub fn peer_open(o: &BgpOpenMessage) -> PeerOpen {
    let caps = o.capabilities();
    let asn4 = caps
        .iter()
        .any(|c| matches!(c, BgpCapability::FourOctetAs(_)));
    let mp = |t: AddressType| {
        caps.iter().any(
            |c| matches!(c, BgpCapability::MultiProtocolExtensions(m) if m.address_type() == t),
        )
    };
    let any_mp = caps
        .iter()
        .any(|c| matches!(c, BgpCapability::MultiProtocolExtensions(_)));
    PeerOpen {
        asn: o.my_asn4(),
        hold_time_s: o.hold_time(),
        router_id: o.bgp_id(),
        asn4,
        ipv4_unicast: !any_mp || mp(AddressType::Ipv4Unicast),
        ipv6_unicast: mp(AddressType::Ipv6Unicast),
    }
}

fn nlri(p: &Ipv4Net) -> Option<Ipv4UnicastAddress> {
    Ipv4Unicast::from_net(*p)
        .ok()
        .map(Ipv4UnicastAddress::new_no_path_id)
}

fn attr(optional: bool, transitive: bool, v: PathAttributeValue) -> Option<PathAttribute> {
    // MP_REACH/MP_UNREACH carry up to IPV6_PREFIXES_PER_UPDATE prefixes, more than a one-byte
    // attribute length holds: they always use the extended (two-byte) length.
    let extended = matches!(
        v,
        PathAttributeValue::MpReach(_) | PathAttributeValue::MpUnreach(_)
    );
    PathAttribute::from(optional, transitive, false, extended, v).ok()
}

fn nlri6(p: &Ipv6Net) -> Option<Ipv6UnicastAddress> {
    Ipv6Unicast::from_net(*p)
        .ok()
        .map(|n| Ipv6UnicastAddress::new(None, n))
}

/// An UPDATE announcing `prefixes` with `attrs` (next hop `next_hop`).
pub fn announce(
    prefixes: &[Ipv4Net],
    attrs: &RouteAttrs,
    local_as: u32,
    ebgp: bool,
    next_hop: Ipv4Addr,
) -> BgpMessage {
    let mut path = common_attrs(attrs, local_as, ebgp);
    path.extend(attr(
        false,
        true,
        PathAttributeValue::NextHop(NextHop::new(next_hop)),
    ));
    let n: Vec<Ipv4UnicastAddress> = prefixes.iter().filter_map(nlri).collect();
    BgpMessage::Update(BgpUpdateMessage::new(vec![], path, n))
}

/// An UPDATE announcing IPv6 `prefixes` in MP_REACH_NLRI (RFC 4760, RFC 2545: the global
/// next hop `next_hop`, no link-local one).
pub fn announce6(
    prefixes: &[Ipv6Net],
    attrs: &RouteAttrs,
    local_as: u32,
    ebgp: bool,
    next_hop: Ipv6Addr,
) -> BgpMessage {
    let mut path = common_attrs(attrs, local_as, ebgp);
    let nlri: Vec<Ipv6UnicastAddress> = prefixes.iter().filter_map(nlri6).collect();
    path.extend(attr(
        true,
        false,
        PathAttributeValue::MpReach(MpReach::Ipv6Unicast {
            next_hop_global: next_hop,
            next_hop_local: None,
            nlri: nlri.into(),
        }),
    ));
    BgpMessage::Update(BgpUpdateMessage::new(vec![], path, vec![]))
}

/// An UPDATE withdrawing IPv6 `prefixes` (MP_UNREACH_NLRI).
pub fn withdraw6(prefixes: &[Ipv6Net]) -> BgpMessage {
    let nlri: Vec<Ipv6UnicastAddress> = prefixes.iter().filter_map(nlri6).collect();
    let path = attr(
        true,
        false,
        PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast { nlri: nlri.into() }),
    );
    BgpMessage::Update(BgpUpdateMessage::new(
        vec![],
        path.into_iter().collect::<Vec<_>>(),
        vec![],
    ))
}

/// (announced, withdrawn) prefixes of an UPDATE, IPv4 NLRI and multiprotocol ones together.
pub fn update_counts(u: &BgpUpdateMessage) -> (u64, u64) {
    let mut ann = u.nlri().len() as u64;
    let mut wd = u.withdraw_routes().len() as u64;
    for a in u.path_attributes() {
        match a.value() {
            PathAttributeValue::MpReach(MpReach::Ipv6Unicast { nlri, .. }) => {
                ann += nlri.len() as u64
            }
            PathAttributeValue::MpReach(MpReach::Ipv4Unicast { nlri, .. }) => {
                ann += nlri.len() as u64
            }
            PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast { nlri }) => {
                wd += nlri.len() as u64
            }
            PathAttributeValue::MpUnreach(MpUnreach::Ipv4Unicast { nlri }) => {
                wd += nlri.len() as u64
            }
            _ => {}
        }
    }
    (ann, wd)
}

/// ORIGIN, AS_PATH (eBGP: our AS plus prepends), MED, LOCAL_PREF (iBGP) and communities.
fn common_attrs(attrs: &RouteAttrs, local_as: u32, ebgp: bool) -> Vec<PathAttribute> {
    let mut path = Vec::new();
    path.extend(attr(false, true, PathAttributeValue::Origin(Origin::IGP)));
    let segments = if ebgp {
        vec![As4PathSegment::new(
            AsPathSegmentType::AsSequence,
            vec![local_as; 1 + usize::from(attrs.prepend)],
        )]
    } else {
        vec![]
    };
    path.extend(attr(
        false,
        true,
        PathAttributeValue::AsPath(AsPath::As4PathSegments(segments.into())),
    ));
    if let Some(med) = attrs.med {
        path.extend(attr(
            true,
            false,
            PathAttributeValue::MultiExitDiscriminator(MultiExitDiscriminator::new(med)),
        ));
    }
    if !ebgp {
        path.extend(attr(
            false,
            true,
            PathAttributeValue::LocalPreference(LocalPreference::new(
                attrs.local_pref.unwrap_or(100),
            )),
        ));
    }
    if !attrs.communities.is_empty() {
        let c: Vec<Community> = attrs
            .communities
            .iter()
            .map(|v| Community::new(*v))
            .collect();
        path.extend(attr(
            true,
            true,
            PathAttributeValue::Communities(Communities::new(c)),
        ));
    }
    if !attrs.large_communities.is_empty() {
        let c: Vec<LargeCommunity> = attrs
            .large_communities
            .iter()
            .map(|(a, b, c)| LargeCommunity::new(*a, *b, *c))
            .collect();
        path.extend(attr(
            true,
            true,
            PathAttributeValue::LargeCommunities(LargeCommunities::new(c)),
        ));
    }
    path
}

pub fn withdraw(prefixes: &[Ipv4Net]) -> BgpMessage {
    let w: Vec<Ipv4UnicastAddress> = prefixes.iter().filter_map(nlri).collect();
    BgpMessage::Update(BgpUpdateMessage::new(w, vec![], vec![]))
}

/// The length of the message at the start of `buf`, once its header is complete.
/// Checks the header of the message at the start of `buf` (RFC 4271 §6.1): the marker, the
/// length (within 19..=4096 and what the type needs) and the type. `Ok(None)`: the header is
/// not complete yet.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16].iter().any(|b| *b != 0xff) {
        return Err(header_error(
            "marker is not all ones".into(),
            MessageHeaderError::ConnectionNotSynchronized {
                value: Box::new([]),
            },
        ));
    }
    let raw = [buf[16], buf[17]];
    let len = usize::from(u16::from_be_bytes(raw));
    let kind = buf[18];
    let fits = match kind {
        OPEN => len >= 29,
        UPDATE => len >= 23,
        NOTIFICATION => len >= 21,
        KEEPALIVE => len == HEADER_LEN,
        ROUTE_REFRESH => len >= 23,
        _ => {
            return Err(header_error(
                format!("unknown message type {kind}"),
                MessageHeaderError::BadMessageType {
                    value: Box::new([kind]),
                },
            ));
        }
    };
    if !fits || !(HEADER_LEN..=MAX_MESSAGE_LEN).contains(&len) {
        return Err(header_error(
            format!("bad length {len} for message type {kind}"),
            MessageHeaderError::BadMessageLength {
                value: Box::new(raw),
            },
        ));
    }
    Ok(Some(len))
}

/// The OPEN checks of RFC 4271 §6.2 that come before decoding: version, BGP identifier,
/// hold time. (The peer AS is checked against the configuration by the FSM.)
fn check_open(frame: &[u8]) -> Result<(), WireError> {
    let body = &frame[HEADER_LEN.min(frame.len())..];
    let [version, _, _, h0, h1, i0, i1, i2, i3, ..] = *body else {
        return Ok(());
    };
    if version != BGP_VERSION {
        return Err(open_error(
            format!("unsupported BGP version {version}"),
            OpenMessageError::UnsupportedVersionNumber {
                value: Box::new(u16::from(BGP_VERSION).to_be_bytes()),
            },
        ));
    }
    let hold = u16::from_be_bytes([h0, h1]);
    if hold == 1 || hold == 2 {
        return Err(open_error(
            format!("unacceptable hold time {hold}"),
            OpenMessageError::UnacceptableHoldTime {
                value: Box::new([]),
            },
        ));
    }
    if [i0, i1, i2, i3] == [0, 0, 0, 0] {
        return Err(open_error(
            "BGP identifier 0.0.0.0".into(),
            OpenMessageError::BadBgpIdentifier {
                value: Box::new([]),
            },
        ));
    }
    Ok(())
}

/// A decoded message and the attribute errors RFC 7606 lets us survive.
#[derive(Debug)]
pub struct Decoded {
    pub message: BgpMessage,
    /// Non-empty: the UPDATE's routes are treated as withdrawn.
    pub attribute_errors: Vec<String>,
}

/// Decodes one whole message (`frame_len` bytes).
pub fn decode(frame: &[u8], asn4: bool) -> Result<Decoded, WireError> {
    let mut ctx = BgpParsingContext::new(
        asn4,
        HashMap::new(),
        HashMap::new(),
        false,
        false,
        false,
        false,
    );
    let kind = frame.get(18).copied().unwrap_or(0);
    if kind == OPEN {
        check_open(frame)?;
    }
    let message = BgpMessage::parse(&mut SliceReader::new(frame), &mut ctx).map_err(|e| {
        let detail = format!("undecodable message of type {kind}: {e:?}");
        let n = match kind {
            OPEN => Some(BgpNotificationMessage::OpenMessageError(
                OpenMessageError::Unspecific {
                    value: Box::new([]),
                },
            )),
            UPDATE => Some(BgpNotificationMessage::UpdateMessageError(
                UpdateMessageError::MalformedAttributeList {
                    value: Box::new([]),
                },
            )),
            ROUTE_REFRESH => Some(BgpNotificationMessage::RouteRefreshError(
                RouteRefreshError::InvalidMessageLength {
                    value: frame.get(16..18).unwrap_or_default().into(),
                },
            )),
            // A NOTIFICATION is never answered with one (§6.4); nothing else gets here.
            _ => None,
        };
        protocol(detail, n)
    })?;
    let ignored = ctx.reset_parsing_errors();
    let attribute_errors = ignored
        .path_attr_errors()
        .iter()
        .map(|e| format!("{e:?}"))
        .collect();
    Ok(Decoded {
        message,
        attribute_errors,
    })
}

/// (code, subcode) of a NOTIFICATION, for logs and metrics.
pub fn notification_code(n: &BgpNotificationMessage) -> (u8, &'static str) {
    match n {
        BgpNotificationMessage::MessageHeaderError(_) => (1, "message header error"),
        BgpNotificationMessage::OpenMessageError(_) => (2, "OPEN message error"),
        BgpNotificationMessage::UpdateMessageError(_) => (3, "UPDATE message error"),
        BgpNotificationMessage::HoldTimerExpiredError(_) => (4, "hold timer expired"),
        BgpNotificationMessage::FiniteStateMachineError(_) => (5, "finite state machine error"),
        BgpNotificationMessage::CeaseError(_) => (6, "cease"),
        BgpNotificationMessage::RouteRefreshError(_) => (7, "route refresh error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_round_trip_and_as_trans() {
        let m = open(4_200_000_001, 9, Ipv4Addr::new(10, 0, 0, 1));
        let b = encode(&m).unwrap();
        assert_eq!(frame_len(&b).unwrap(), Some(b.len()));
        let d = decode(&b, false).unwrap();
        let BgpMessage::Open(o) = &d.message else {
            panic!("not an OPEN")
        };
        assert_eq!(o.my_as(), AS_TRANS);
        let p = peer_open(o);
        assert_eq!(p.asn, 4_200_000_001);
        assert!(p.asn4);
        assert_eq!(p.hold_time_s, 9);
    }

    #[test]
    fn update_carries_our_attributes() {
        let attrs = RouteAttrs {
            med: Some(200),
            prepend: 3,
            communities: vec![GRACEFUL_SHUTDOWN],
            large_communities: vec![(65100, 1, 2)],
            local_pref: None,
        };
        let vip: Ipv4Net = "203.0.113.10/32".parse().unwrap();
        let m = announce(&[vip], &attrs, 65100, true, Ipv4Addr::new(192, 0, 2, 2));
        let b = encode(&m).unwrap();
        let d = decode(&b, true).unwrap();
        assert!(d.attribute_errors.is_empty());
        let BgpMessage::Update(u) = &d.message else {
            panic!()
        };
        assert_eq!(u.nlri().len(), 1);
        let vals: Vec<&PathAttributeValue> =
            u.path_attributes().iter().map(|a| a.value()).collect();
        assert!(vals.iter().any(
            |v| matches!(v, PathAttributeValue::MultiExitDiscriminator(m) if m.metric() == 200)
        ));
        let path = vals
            .iter()
            .find_map(|v| match v {
                PathAttributeValue::AsPath(AsPath::As4PathSegments(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(path[0].as_numbers(), &[65100, 65100, 65100, 65100]);
        let w = encode(&withdraw(&[vip])).unwrap();
        let BgpMessage::Update(u) = decode(&w, true).unwrap().message else {
            panic!()
        };
        assert_eq!(u.withdraw_routes().len(), 1);
    }

    #[test]
    fn ipv6_routes_round_trip_in_multiprotocol_attributes() {
        let attrs = RouteAttrs {
            med: Some(200),
            prepend: 3,
            ..Default::default()
        };
        let vip: Ipv6Net = "2001:db8:aaaa::10/128".parse().unwrap();
        let nh: Ipv6Addr = "2001:db8:1::2".parse().unwrap();
        let b = encode(&announce6(&[vip], &attrs, 65100, true, nh)).unwrap();
        let d = decode(&b, true).unwrap();
        assert!(d.attribute_errors.is_empty(), "{:?}", d.attribute_errors);
        let BgpMessage::Update(u) = &d.message else {
            panic!()
        };
        assert!(
            u.nlri().is_empty(),
            "IPv6 prefixes are not in the IPv4 NLRI field"
        );
        assert_eq!(update_counts(u), (1, 0));
        let reach = u
            .path_attributes()
            .iter()
            .find_map(|a| match a.value() {
                PathAttributeValue::MpReach(MpReach::Ipv6Unicast {
                    next_hop_global,
                    next_hop_local,
                    nlri,
                }) => Some((*next_hop_global, *next_hop_local, nlri.clone())),
                _ => None,
            })
            .unwrap();
        assert_eq!(reach.0, nh);
        assert_eq!(reach.1, None);
        assert_eq!(reach.2[0].network().address(), vip);
        assert!(
            !u.path_attributes()
                .iter()
                .any(|a| matches!(a.value(), PathAttributeValue::NextHop(_))),
            "no IPv4 NEXT_HOP with IPv6-only reachability"
        );
        let w = encode(&withdraw6(&[vip])).unwrap();
        let BgpMessage::Update(u) = decode(&w, true).unwrap().message else {
            panic!()
        };
        assert_eq!(update_counts(&u), (0, 1));
        // Capabilities: our OPEN offers both families.
        let BgpMessage::Open(o) =
            decode(&encode(&open(65100, 9, Ipv4Addr::LOCALHOST)).unwrap(), true)
                .unwrap()
                .message
        else {
            panic!()
        };
        let p = peer_open(&o);
        assert!(p.ipv4_unicast && p.ipv6_unicast);
    }

    /// The fullest UPDATEs we build (every prefix a host route, every attribute set, a few
    /// communities) fit in a BGP message.
    #[test]
    fn full_updates_fit_in_a_message() {
        let attrs = RouteAttrs {
            med: Some(200),
            prepend: 32,
            communities: vec![GRACEFUL_SHUTDOWN, 1, 2, 3, 4, 5, 6, 7],
            large_communities: vec![(65100, 1, 2); 8],
            local_pref: Some(100),
        };
        let v4: Vec<Ipv4Net> = (0..IPV4_PREFIXES_PER_UPDATE as u32)
            .map(|i| Ipv4Net::new(Ipv4Addr::from(0xc612_0000 + i), 32).unwrap())
            .collect();
        let v6: Vec<Ipv6Net> = (0..IPV6_PREFIXES_PER_UPDATE as u128)
            .map(|i| Ipv6Net::new(Ipv6Addr::from(0x2001_0db8_00ee_u128 << 80 | i), 128).unwrap())
            .collect();
        let nh6: Ipv6Addr = "2001:db8:2:1::2".parse().unwrap();
        for (what, m) in [
            (
                "v4 eBGP",
                announce(&v4, &attrs, 4_200_000_001, true, Ipv4Addr::LOCALHOST),
            ),
            (
                "v4 iBGP",
                announce(&v4, &attrs, 65100, false, Ipv4Addr::LOCALHOST),
            ),
            ("v4 withdraw", withdraw(&v4)),
            ("v6 eBGP", announce6(&v6, &attrs, 4_200_000_001, true, nh6)),
            ("v6 withdraw", withdraw6(&v6)),
        ] {
            let b = encode(&m).unwrap();
            assert!(b.len() <= MAX_MESSAGE_LEN, "{what}: {} bytes", b.len());
            assert_eq!(frame_len(&b).unwrap(), Some(b.len()), "{what}");
        }
    }

    #[test]
    fn framing_rejects_bad_headers_and_malformed_attributes_are_survivable() {
        assert!(frame_len(&[0xff; 10]).unwrap().is_none());
        let mut bad = vec![0xff; 19];
        bad[0] = 0;
        assert!(frame_len(&bad).is_err());
        let mut short = vec![0xff; 19];
        short[16] = 0;
        short[17] = 10;
        assert!(frame_len(&short).is_err());
        // An UPDATE whose ORIGIN is 5 (only 0-2 exist): RFC 7606 says treat-as-withdraw,
        // and the decoder reports it instead of failing the message.
        let vip: Ipv4Net = "203.0.113.10/32".parse().unwrap();
        let good = encode(&announce(
            &[vip],
            &RouteAttrs::default(),
            65100,
            true,
            Ipv4Addr::new(192, 0, 2, 2),
        ))
        .unwrap();
        let i = good.windows(4).position(|w| w == [0x40, 1, 1, 0]).unwrap();
        let mut broken = good.clone();
        broken[i + 3] = 5;
        match decode(&broken, true) {
            Ok(d) => assert!(!d.attribute_errors.is_empty(), "{d:?}"),
            Err(e) => panic!("a malformed MED must not fail the message: {e}"),
        }
    }

    /// What a neighbour (or anyone who reaches the BGP port) sends is decoded by
    /// `netgauze-bgp-pkt` behind our framing: no bytes may panic it, whatever the message type,
    /// the 2- or 4-byte AS mode, a cut anywhere (the length field then says so), or bytes
    /// changed anywhere in a message of every kind we and FRR send. A decoded message is read
    /// as the speaker reads it (`peer_open`, `update_counts`) and re-encodes without a panic.
    /// Deterministic, for CI; `bgp/fuzz` has the cargo-fuzz target.
    #[test]
    fn never_panics_on_any_prefix_or_mutation() {
        let attrs = RouteAttrs {
            med: Some(200),
            prepend: 2,
            communities: vec![GRACEFUL_SHUTDOWN, 7],
            large_communities: vec![(65100, 1, 2)],
            local_pref: Some(100),
        };
        let v4: Vec<Ipv4Net> = vec![
            "203.0.113.10/32".parse().unwrap(),
            "198.51.100.0/24".parse().unwrap(),
        ];
        let v6: Vec<Ipv6Net> = vec!["2001:db8:aaaa::10/128".parse().unwrap()];
        let nh = Ipv4Addr::new(192, 0, 2, 2);
        let cease = BgpMessage::Notification(BgpNotificationMessage::OpenMessageError(
            OpenMessageError::BadPeerAs {
                value: Box::new([0xfd, 0xe8]),
            },
        ));
        let seeds: Vec<Vec<u8>> = [
            open(4_200_000_001, 9, Ipv4Addr::new(10, 0, 0, 1)),
            announce(&v4, &attrs, 65100, true, nh),
            announce(&v4, &attrs, 65100, false, nh),
            announce6(&v6, &attrs, 65100, true, "2001:db8::2".parse().unwrap()),
            withdraw(&v4),
            withdraw6(&v6),
            BgpMessage::KeepAlive,
            cease,
        ]
        .iter()
        .map(|m| encode(m).unwrap())
        .collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let read = |b: &[u8]| {
            let Ok(Some(len)) = frame_len(b) else { return };
            let Some(frame) = b.get(..len) else { return };
            for asn4 in [true, false] {
                if let Ok(d) = decode(frame, asn4) {
                    match &d.message {
                        BgpMessage::Open(o) => {
                            let _ = peer_open(o);
                        }
                        BgpMessage::Update(u) => {
                            let _ = update_counts(u);
                        }
                        _ => {}
                    }
                    let _ = encode(&d.message);
                }
            }
        };
        for base in &seeds {
            // Every prefix, its length field saying so.
            for l in HEADER_LEN..=base.len() {
                let mut b = base[..l].to_vec();
                b[16..18].copy_from_slice(&(l as u16).to_be_bytes());
                read(&b);
            }
            for _ in 0..10_000 {
                let mut b = base.clone();
                // One to four bytes of the body changed.
                for _ in 0..1 + next() % 4 {
                    if b.len() > HEADER_LEN {
                        let r = next();
                        let i = HEADER_LEN + r as usize % (b.len() - HEADER_LEN);
                        b[i] = (r >> 32) as u8;
                    }
                }
                // Now and then another message type, or a random body of any length.
                if next() % 16 == 0 {
                    b[18] = 1 + (next() % 5) as u8;
                }
                if next() % 16 == 0 {
                    let l = HEADER_LEN + next() as usize % 200;
                    b = vec![0xff; 16];
                    b.extend_from_slice(&(l as u16).to_be_bytes());
                    b.push(1 + (next() % 5) as u8);
                    b.resize_with(l, || next() as u8);
                }
                // A cut in one of eight.
                if next() % 8 == 0 {
                    let l = HEADER_LEN + next() as usize % (b.len() - HEADER_LEN + 1);
                    b.truncate(l);
                    b[16..18].copy_from_slice(&(l as u16).to_be_bytes());
                }
                read(&b);
            }
        }
    }
}
