//! The BFD control packet (RFC 5880 §4.1) and its authentication section (§4.2-4.4): a pure
//! codec. `decode` applies the reception checks of §6.8.6 that need no session state
//! (version, lengths, detect multiplier, multipoint, my discriminator, your discriminator vs
//! state, auth section shape); every malformed input is a [`DecodeError`], never a panic.

use std::fmt;

/// Size of the mandatory section.
pub const HEADER_LEN: usize = 24;
/// BFD version this codec speaks.
pub const VERSION: u8 = 1;

/// Session state as carried on the wire (§4.1 "Sta").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl State {
    pub fn from_bits(b: u8) -> State {
        match b & 3 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }

    /// loxilb's REST spelling.
    pub fn loxilb_name(self) -> &'static str {
        match self {
            State::AdminDown => "BFDAdminDown",
            State::Down => "BFDDown",
            State::Init => "BFDInit",
            State::Up => "BFDUp",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            State::AdminDown => "AdminDown",
            State::Down => "Down",
            State::Init => "Init",
            State::Up => "Up",
        };
        f.write_str(s)
    }
}

/// Diagnostic codes (§4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Diag {
    None = 0,
    ControlDetectionTimeExpired = 1,
    EchoFunctionFailed = 2,
    NeighborSignaledSessionDown = 3,
    ForwardingPlaneReset = 4,
    PathDown = 5,
    ConcatenatedPathDown = 6,
    AdministrativelyDown = 7,
    ReverseConcatenatedPathDown = 8,
    /// 9-31: reserved; kept so a decoded packet re-encodes unchanged.
    Reserved = 31,
}

impl Diag {
    pub fn from_bits(b: u8) -> Diag {
        match b & 0x1f {
            0 => Diag::None,
            1 => Diag::ControlDetectionTimeExpired,
            2 => Diag::EchoFunctionFailed,
            3 => Diag::NeighborSignaledSessionDown,
            4 => Diag::ForwardingPlaneReset,
            5 => Diag::PathDown,
            6 => Diag::ConcatenatedPathDown,
            7 => Diag::AdministrativelyDown,
            8 => Diag::ReverseConcatenatedPathDown,
            _ => Diag::Reserved,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Diag::None => "none",
            Diag::ControlDetectionTimeExpired => "control detection time expired",
            Diag::EchoFunctionFailed => "echo function failed",
            Diag::NeighborSignaledSessionDown => "neighbor signaled session down",
            Diag::ForwardingPlaneReset => "forwarding plane reset",
            Diag::PathDown => "path down",
            Diag::ConcatenatedPathDown => "concatenated path down",
            Diag::AdministrativelyDown => "administratively down",
            Diag::ReverseConcatenatedPathDown => "reverse concatenated path down",
            Diag::Reserved => "reserved",
        }
    }
}

/// Authentication types (§4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthType {
    SimplePassword = 1,
    KeyedMd5 = 2,
    MeticulousKeyedMd5 = 3,
    KeyedSha1 = 4,
    MeticulousKeyedSha1 = 5,
}

impl AuthType {
    fn from_u8(v: u8) -> Option<AuthType> {
        Some(match v {
            1 => AuthType::SimplePassword,
            2 => AuthType::KeyedMd5,
            3 => AuthType::MeticulousKeyedMd5,
            4 => AuthType::KeyedSha1,
            5 => AuthType::MeticulousKeyedSha1,
            _ => return None,
        })
    }

    pub fn is_meticulous(self) -> bool {
        matches!(
            self,
            AuthType::MeticulousKeyedMd5 | AuthType::MeticulousKeyedSha1
        )
    }
}

/// The authentication section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// §4.2: 1 to 16 bytes of password.
    Simple { key_id: u8, password: Vec<u8> },
    /// §4.3 (MD5, 16-byte digest) and §4.4 (SHA1, 20-byte hash).
    Keyed {
        auth_type: AuthType,
        key_id: u8,
        seq: u32,
        digest: Vec<u8>,
    },
}

impl Auth {
    pub fn auth_type(&self) -> AuthType {
        match self {
            Auth::Simple { .. } => AuthType::SimplePassword,
            Auth::Keyed { auth_type, .. } => *auth_type,
        }
    }

    pub fn key_id(&self) -> u8 {
        match self {
            Auth::Simple { key_id, .. } | Auth::Keyed { key_id, .. } => *key_id,
        }
    }

    fn wire_len(&self) -> usize {
        match self {
            Auth::Simple { password, .. } => 3 + password.len(),
            Auth::Keyed { digest, .. } => 8 + digest.len(),
        }
    }
}

/// A BFD control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub diag: Diag,
    pub state: State,
    pub poll: bool,
    pub final_: bool,
    pub control_plane_independent: bool,
    pub demand: bool,
    pub multipoint: bool,
    pub detect_mult: u8,
    pub my_discr: u32,
    pub your_discr: u32,
    pub desired_min_tx_us: u32,
    pub required_min_rx_us: u32,
    pub required_min_echo_rx_us: u32,
    pub auth: Option<Auth>,
}

/// Why a packet was discarded on reception.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet of {0} bytes is shorter than the 24-byte header")]
    TooShort(usize),
    #[error("version {0}, not 1")]
    BadVersion(u8),
    #[error("length field {length} is invalid for a {received}-byte payload")]
    BadLength { length: u8, received: usize },
    #[error("detect multiplier is zero")]
    ZeroDetectMult,
    #[error("multipoint bit set")]
    Multipoint,
    #[error("my discriminator is zero")]
    ZeroMyDiscr,
    #[error("your discriminator is zero in state {0}")]
    ZeroYourDiscr(State),
    #[error("authentication section: {0}")]
    BadAuth(&'static str),
}

impl Packet {
    /// The encoded length.
    pub fn len(&self) -> usize {
        HEADER_LEN + self.auth.as_ref().map_or(0, Auth::wire_len)
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Encodes the packet (the auth digest as stored; see `auth::sign` for computing it).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.len());
        b.push((VERSION << 5) | (self.diag as u8 & 0x1f));
        let mut flags = (self.state as u8) << 6;
        flags |= u8::from(self.poll) << 5;
        flags |= u8::from(self.final_) << 4;
        flags |= u8::from(self.control_plane_independent) << 3;
        flags |= u8::from(self.auth.is_some()) << 2;
        flags |= u8::from(self.demand) << 1;
        flags |= u8::from(self.multipoint);
        b.push(flags);
        b.push(self.detect_mult);
        b.push(self.len() as u8);
        b.extend_from_slice(&self.my_discr.to_be_bytes());
        b.extend_from_slice(&self.your_discr.to_be_bytes());
        b.extend_from_slice(&self.desired_min_tx_us.to_be_bytes());
        b.extend_from_slice(&self.required_min_rx_us.to_be_bytes());
        b.extend_from_slice(&self.required_min_echo_rx_us.to_be_bytes());
        match &self.auth {
            None => {}
            Some(Auth::Simple { key_id, password }) => {
                b.push(AuthType::SimplePassword as u8);
                b.push((3 + password.len()) as u8);
                b.push(*key_id);
                b.extend_from_slice(password);
            }
            Some(Auth::Keyed {
                auth_type,
                key_id,
                seq,
                digest,
            }) => {
                b.push(*auth_type as u8);
                b.push((8 + digest.len()) as u8);
                b.push(*key_id);
                b.push(0);
                b.extend_from_slice(&seq.to_be_bytes());
                b.extend_from_slice(digest);
            }
        }
        b
    }

    /// Decodes and applies the stateless reception checks of §6.8.6.
    pub fn decode(buf: &[u8]) -> Result<Packet, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::TooShort(buf.len()));
        }
        let version = buf[0] >> 5;
        if version != VERSION {
            return Err(DecodeError::BadVersion(version));
        }
        let flags = buf[1];
        let auth_present = flags & 0x04 != 0;
        let length = buf[3];
        let min = if auth_present { 26 } else { HEADER_LEN };
        if usize::from(length) < min || usize::from(length) > buf.len() {
            return Err(DecodeError::BadLength {
                length,
                received: buf.len(),
            });
        }
        let detect_mult = buf[2];
        if detect_mult == 0 {
            return Err(DecodeError::ZeroDetectMult);
        }
        if flags & 0x01 != 0 {
            return Err(DecodeError::Multipoint);
        }
        let word = |i: usize| u32::from_be_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let my_discr = word(4);
        if my_discr == 0 {
            return Err(DecodeError::ZeroMyDiscr);
        }
        let state = State::from_bits(flags >> 6);
        let your_discr = word(8);
        if your_discr == 0 && !matches!(state, State::Down | State::AdminDown) {
            return Err(DecodeError::ZeroYourDiscr(state));
        }
        let auth = if auth_present {
            Some(decode_auth(&buf[HEADER_LEN..usize::from(length)])?)
        } else {
            None
        };
        Ok(Packet {
            diag: Diag::from_bits(buf[0]),
            state,
            poll: flags & 0x20 != 0,
            final_: flags & 0x10 != 0,
            control_plane_independent: flags & 0x08 != 0,
            demand: flags & 0x02 != 0,
            multipoint: false,
            detect_mult,
            my_discr,
            your_discr,
            desired_min_tx_us: word(12),
            required_min_rx_us: word(16),
            required_min_echo_rx_us: word(20),
            auth,
        })
    }
}

fn decode_auth(a: &[u8]) -> Result<Auth, DecodeError> {
    if a.len() < 2 {
        return Err(DecodeError::BadAuth("truncated"));
    }
    let auth_type = AuthType::from_u8(a[0]).ok_or(DecodeError::BadAuth("unknown type"))?;
    let auth_len = usize::from(a[1]);
    if auth_len != a.len() {
        return Err(DecodeError::BadAuth(
            "auth len disagrees with packet length",
        ));
    }
    match auth_type {
        AuthType::SimplePassword => {
            // §4.2: Auth Len = 3 + password length, password 1..=16 bytes.
            if !(4..=19).contains(&auth_len) {
                return Err(DecodeError::BadAuth("simple password length"));
            }
            Ok(Auth::Simple {
                key_id: a[2],
                password: a[3..].to_vec(),
            })
        }
        AuthType::KeyedMd5
        | AuthType::MeticulousKeyedMd5
        | AuthType::KeyedSha1
        | AuthType::MeticulousKeyedSha1 => {
            let want = match auth_type {
                AuthType::KeyedMd5 | AuthType::MeticulousKeyedMd5 => 24,
                _ => 28,
            };
            if auth_len != want {
                return Err(DecodeError::BadAuth("keyed auth length"));
            }
            Ok(Auth::Keyed {
                auth_type,
                key_id: a[2],
                seq: u32::from_be_bytes([a[4], a[5], a[6], a[7]]),
                digest: a[8..].to_vec(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Packet {
        Packet {
            diag: Diag::None,
            state: State::Up,
            poll: true,
            final_: false,
            control_plane_independent: false,
            demand: false,
            multipoint: false,
            detect_mult: 3,
            my_discr: 0x1122_3344,
            your_discr: 0x5566_7788,
            desired_min_tx_us: 100_000,
            required_min_rx_us: 100_000,
            required_min_echo_rx_us: 0,
            auth: None,
        }
    }

    #[test]
    fn round_trips_with_and_without_auth() {
        let mut p = sample();
        let b = p.encode();
        assert_eq!(b.len(), 24);
        assert_eq!(b[0], 0x20); // version 1, diag 0
        assert_eq!(b[1], 0xe0); // Up, Poll
        assert_eq!(Packet::decode(&b).unwrap(), p);
        p.auth = Some(Auth::Simple {
            key_id: 7,
            password: b"secret".to_vec(),
        });
        assert_eq!(Packet::decode(&p.encode()).unwrap(), p);
        p.auth = Some(Auth::Keyed {
            auth_type: AuthType::MeticulousKeyedSha1,
            key_id: 1,
            seq: 42,
            digest: vec![0xaa; 20],
        });
        let b = p.encode();
        assert_eq!(b.len(), 24 + 28);
        assert_eq!(b[3], 52);
        assert_eq!(Packet::decode(&b).unwrap(), p);
        p.diag = Diag::Reserved;
        assert_eq!(Packet::decode(&p.encode()).unwrap().diag, Diag::Reserved);
    }

    #[test]
    fn reception_checks() {
        let good = sample().encode();
        let with = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            b
        };
        assert_eq!(Packet::decode(&good[..23]), Err(DecodeError::TooShort(23)));
        assert_eq!(
            Packet::decode(&with(0, 0x40)),
            Err(DecodeError::BadVersion(2))
        );
        assert!(matches!(
            Packet::decode(&with(3, 23)),
            Err(DecodeError::BadLength { .. })
        ));
        assert!(matches!(
            Packet::decode(&with(3, 25)),
            Err(DecodeError::BadLength { .. })
        ));
        assert_eq!(
            Packet::decode(&with(2, 0)),
            Err(DecodeError::ZeroDetectMult)
        );
        assert_eq!(Packet::decode(&with(1, 0xc1)), Err(DecodeError::Multipoint));
        let mut b = good.clone();
        b[4..8].copy_from_slice(&[0; 4]);
        assert_eq!(Packet::decode(&b), Err(DecodeError::ZeroMyDiscr));
        let mut b = good.clone();
        b[8..12].copy_from_slice(&[0; 4]);
        assert_eq!(
            Packet::decode(&b),
            Err(DecodeError::ZeroYourDiscr(State::Up))
        );
        b[1] = 0x40; // Down: your discriminator may be zero
        assert!(Packet::decode(&b).is_ok());
        // A bit set but no room for the section.
        assert!(matches!(
            Packet::decode(&with(1, 0xc4)),
            Err(DecodeError::BadLength { .. })
        ));
        // Extra bytes after Length are ignored (the length field rules).
        let mut b = good.clone();
        b.extend_from_slice(&[1, 2, 3]);
        assert!(Packet::decode(&b).is_ok());
    }

    #[test]
    fn auth_section_checks() {
        let mut p = sample();
        p.auth = Some(Auth::Keyed {
            auth_type: AuthType::KeyedSha1,
            key_id: 1,
            seq: 1,
            digest: vec![0; 20],
        });
        let b = p.encode();
        let mut bad = b.clone();
        bad[25] = 27; // auth len
        assert_eq!(
            Packet::decode(&bad),
            Err(DecodeError::BadAuth(
                "auth len disagrees with packet length"
            ))
        );
        let mut bad = b.clone();
        bad[24] = 9; // unknown type
        assert_eq!(
            Packet::decode(&bad),
            Err(DecodeError::BadAuth("unknown type"))
        );
        let mut bad = b.clone();
        bad[24] = 2; // MD5 type with a SHA1-sized section
        assert_eq!(
            Packet::decode(&bad),
            Err(DecodeError::BadAuth("keyed auth length"))
        );
    }

    #[test]
    fn never_panics_on_any_prefix_or_mutation() {
        let mut p = sample();
        p.auth = Some(Auth::Simple {
            key_id: 1,
            password: b"pw".to_vec(),
        });
        let base = p.encode();
        let mut x: u32 = 12345;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let mut b = base.clone();
            let i = (x as usize) % b.len();
            b[i] = (x >> 8) as u8;
            b.truncate((x as usize >> 16) % (b.len() + 1));
            if let Ok(p) = Packet::decode(&b) {
                assert_eq!(Packet::decode(&p.encode()), Ok(p), "round trip of {b:?}");
            }
        }
    }
}
