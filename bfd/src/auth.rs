//! Authentication (RFC 5880 §6.7): simple password, keyed SHA1 and meticulous keyed SHA1,
//! with the sequence-number rules of §6.7.4. Pure functions over packets; the session keeps
//! the [`AuthState`].

use sha1::{Digest, Sha1};

use crate::packet::{Auth, AuthType, HEADER_LEN, Packet};

/// A session's authentication configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// `SimplePassword`, `KeyedSha1` or `MeticulousKeyedSha1`.
    pub auth_type: AuthType,
    pub key_id: u8,
    /// Password (1-16 bytes) or SHA1 key (1-20 bytes, zero-padded to 20).
    pub secret: Vec<u8>,
}

/// Why a configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthConfigError {
    #[error(
        "authentication type {0:?} is not supported (simple password, keyed SHA1, meticulous keyed SHA1 are)"
    )]
    Unsupported(AuthType),
    #[error("secret must be 1..={max} bytes, got {len}")]
    SecretLength { max: usize, len: usize },
}

impl AuthConfig {
    pub fn validate(&self) -> Result<(), AuthConfigError> {
        let max = match self.auth_type {
            AuthType::SimplePassword => 16,
            AuthType::KeyedSha1 | AuthType::MeticulousKeyedSha1 => 20,
            other => return Err(AuthConfigError::Unsupported(other)),
        };
        if self.secret.is_empty() || self.secret.len() > max {
            return Err(AuthConfigError::SecretLength {
                max,
                len: self.secret.len(),
            });
        }
        Ok(())
    }
}

/// Why a received packet failed authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("packet is not authenticated")]
    Missing,
    #[error("packet is authenticated but the session is not")]
    Unexpected,
    #[error("authentication type differs")]
    WrongType,
    #[error("key id differs")]
    WrongKeyId,
    #[error("password or digest does not match")]
    BadDigest,
    #[error("sequence number out of the accepted window")]
    BadSequence,
}

/// Per-session sequence state (§6.8.1 bfd.RcvAuthSeq, bfd.XmitAuthSeq, bfd.AuthSeqKnown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthState {
    pub rcv_seq: u32,
    pub xmit_seq: u32,
    pub seq_known: bool,
}

impl AuthState {
    /// A fresh state; `xmit_seq` should start at a random value (§6.8.1).
    pub fn new(xmit_seq: u32) -> AuthState {
        AuthState {
            rcv_seq: 0,
            xmit_seq,
            seq_known: false,
        }
    }
}

fn sha1_key(secret: &[u8]) -> [u8; 20] {
    let mut k = [0u8; 20];
    let n = secret.len().min(20);
    k[..n].copy_from_slice(&secret[..n]);
    k
}

/// Fills in the authentication section of `p` (and advances the transmit sequence).
pub fn sign(p: &mut Packet, cfg: &AuthConfig, st: &mut AuthState) {
    match cfg.auth_type {
        AuthType::SimplePassword => {
            p.auth = Some(Auth::Simple {
                key_id: cfg.key_id,
                password: cfg.secret.clone(),
            });
        }
        t => {
            // Meticulous: a new number for every packet. Keyed: "occasionally"; we also
            // advance every packet, which every receiver window accepts.
            st.xmit_seq = st.xmit_seq.wrapping_add(1);
            p.auth = Some(Auth::Keyed {
                auth_type: t,
                key_id: cfg.key_id,
                seq: st.xmit_seq,
                digest: sha1_key(&cfg.secret).to_vec(),
            });
            let mut bytes = p.encode();
            let digest = Sha1::digest(&bytes[..]);
            let at = HEADER_LEN + 8;
            bytes[at..at + 20].copy_from_slice(&digest);
            if let Some(Auth::Keyed { digest: d, .. }) = &mut p.auth {
                d.copy_from_slice(&digest);
            }
        }
    }
}

/// Checks a received packet against the session's configuration (§6.7.2, §6.7.4) and, when
/// it passes, records its sequence number. `raw` is the packet as received.
pub fn verify(
    p: &Packet,
    raw: &[u8],
    cfg: Option<&AuthConfig>,
    st: &mut AuthState,
    detect_mult: u8,
) -> Result<(), AuthError> {
    let (cfg, auth) = match (cfg, &p.auth) {
        (None, None) => return Ok(()),
        (None, Some(_)) => return Err(AuthError::Unexpected),
        (Some(_), None) => return Err(AuthError::Missing),
        (Some(c), Some(a)) => (c, a),
    };
    if auth.auth_type() != cfg.auth_type {
        return Err(AuthError::WrongType);
    }
    if auth.key_id() != cfg.key_id {
        return Err(AuthError::WrongKeyId);
    }
    match auth {
        Auth::Simple { password, .. } => {
            if *password != cfg.secret {
                return Err(AuthError::BadDigest);
            }
            Ok(())
        }
        Auth::Keyed {
            auth_type,
            seq,
            digest,
            ..
        } => {
            if st.seq_known {
                // §6.7.4: the window is RcvAuthSeq..=RcvAuthSeq + 3 * DetectMult (circular),
                // excluding RcvAuthSeq itself for the meticulous variant.
                let lo = if auth_type.is_meticulous() {
                    st.rcv_seq.wrapping_add(1)
                } else {
                    st.rcv_seq
                };
                let hi = st.rcv_seq.wrapping_add(3 * u32::from(detect_mult));
                let in_window = seq.wrapping_sub(lo) <= hi.wrapping_sub(lo);
                if !in_window {
                    return Err(AuthError::BadSequence);
                }
            }
            let len = usize::from(raw.get(3).copied().unwrap_or(0)).min(raw.len());
            let at = HEADER_LEN + 8;
            if len < at + 20 {
                return Err(AuthError::BadDigest);
            }
            let mut copy = raw[..len].to_vec();
            copy[at..at + 20].copy_from_slice(&sha1_key(&cfg.secret));
            let want = Sha1::digest(&copy[..]);
            if want.as_slice() != digest.as_slice() {
                return Err(AuthError::BadDigest);
            }
            st.rcv_seq = *seq;
            st.seq_known = true;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Diag, State};

    fn pkt() -> Packet {
        Packet {
            diag: Diag::None,
            state: State::Up,
            poll: false,
            final_: false,
            control_plane_independent: false,
            demand: false,
            multipoint: false,
            detect_mult: 3,
            my_discr: 1,
            your_discr: 2,
            desired_min_tx_us: 100_000,
            required_min_rx_us: 100_000,
            required_min_echo_rx_us: 0,
            auth: None,
        }
    }

    fn cfg(t: AuthType, secret: &[u8]) -> AuthConfig {
        AuthConfig {
            auth_type: t,
            key_id: 5,
            secret: secret.to_vec(),
        }
    }

    #[test]
    fn sha1_sign_then_verify_and_reject_a_wrong_key() {
        for t in [AuthType::KeyedSha1, AuthType::MeticulousKeyedSha1] {
            let c = cfg(t, b"ferrolb-key");
            let mut tx = AuthState::new(100);
            let mut rx = AuthState::new(0);
            let mut p = pkt();
            sign(&mut p, &c, &mut tx);
            let raw = p.encode();
            let got = Packet::decode(&raw).unwrap();
            assert_eq!(verify(&got, &raw, Some(&c), &mut rx, 3), Ok(()));
            assert_eq!(rx.rcv_seq, 101);
            let wrong = cfg(t, b"other-key");
            let mut rx2 = AuthState::new(0);
            assert_eq!(
                verify(&got, &raw, Some(&wrong), &mut rx2, 3),
                Err(AuthError::BadDigest)
            );
            // A flipped bit anywhere breaks the digest.
            let mut bad = raw.clone();
            bad[16] ^= 1;
            let badp = Packet::decode(&bad).unwrap();
            assert_eq!(
                verify(&badp, &bad, Some(&c), &mut AuthState::new(0), 3),
                Err(AuthError::BadDigest)
            );
        }
    }

    #[test]
    fn sequence_windows() {
        let c = cfg(AuthType::MeticulousKeyedSha1, b"k");
        let mut tx = AuthState::new(u32::MAX - 1); // wraps around zero on the way
        let mut rx = AuthState::new(0);
        let mut last_raw = Vec::new();
        for _ in 0..5 {
            let mut p = pkt();
            sign(&mut p, &c, &mut tx);
            last_raw = p.encode();
            let got = Packet::decode(&last_raw).unwrap();
            assert_eq!(verify(&got, &last_raw, Some(&c), &mut rx, 3), Ok(()));
        }
        // Meticulous: a replay of the last packet is refused.
        let replay = Packet::decode(&last_raw).unwrap();
        assert_eq!(
            verify(&replay, &last_raw, Some(&c), &mut rx, 3),
            Err(AuthError::BadSequence)
        );
        // Beyond 3 x DetectMult ahead: refused.
        tx.xmit_seq = rx.rcv_seq.wrapping_add(20);
        let mut p = pkt();
        sign(&mut p, &c, &mut tx);
        let raw = p.encode();
        assert_eq!(
            verify(&Packet::decode(&raw).unwrap(), &raw, Some(&c), &mut rx, 3),
            Err(AuthError::BadSequence)
        );
        // Keyed (not meticulous) accepts a repeat of the last number.
        let k = cfg(AuthType::KeyedSha1, b"k");
        let mut tx = AuthState::new(7);
        let mut rx = AuthState::new(0);
        let mut p = pkt();
        sign(&mut p, &k, &mut tx);
        let raw = p.encode();
        let got = Packet::decode(&raw).unwrap();
        assert_eq!(verify(&got, &raw, Some(&k), &mut rx, 3), Ok(()));
        assert_eq!(verify(&got, &raw, Some(&k), &mut rx, 3), Ok(()));
    }

    #[test]
    fn simple_password_and_mismatches() {
        let c = cfg(AuthType::SimplePassword, b"pw");
        let mut st = AuthState::new(0);
        let mut p = pkt();
        sign(&mut p, &c, &mut st);
        let raw = p.encode();
        let got = Packet::decode(&raw).unwrap();
        assert_eq!(verify(&got, &raw, Some(&c), &mut st, 3), Ok(()));
        assert_eq!(
            verify(
                &got,
                &raw,
                Some(&cfg(AuthType::SimplePassword, b"px")),
                &mut st,
                3
            ),
            Err(AuthError::BadDigest)
        );
        assert_eq!(
            verify(
                &got,
                &raw,
                Some(&cfg(AuthType::KeyedSha1, b"pw")),
                &mut st,
                3
            ),
            Err(AuthError::WrongType)
        );
        assert_eq!(
            verify(&got, &raw, None, &mut st, 3),
            Err(AuthError::Unexpected)
        );
        let plain = pkt();
        assert_eq!(
            verify(&plain, &plain.encode(), Some(&c), &mut st, 3),
            Err(AuthError::Missing)
        );
        let mut other_key = c.clone();
        other_key.key_id = 6;
        assert_eq!(
            verify(&got, &raw, Some(&other_key), &mut st, 3),
            Err(AuthError::WrongKeyId)
        );
        assert!(cfg(AuthType::KeyedMd5, b"x").validate().is_err());
        assert!(cfg(AuthType::SimplePassword, &[1; 17]).validate().is_err());
        assert!(cfg(AuthType::KeyedSha1, &[1; 20]).validate().is_ok());
    }
}
