//! Strict JSON for JWT headers and claims: serde visitors that refuse repeated members
//! (which `serde_json` would silently resolve to the last), more than [`MAX_MEMBERS`]
//! members, and wrong types, and that map each failure to the [`JwtRejection`] the audit
//! log records. Hand-written because derived deserialisers accept all of these.

use std::borrow::Cow;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{Audience, Claims, Header, JwtRejection, MAX_MEMBERS};

/// The message of the error that marks a repeated member, told apart from other parse
/// errors by [`rejection`].
const REPEATED: &str = "repeated member";
/// The message of the error for an object with more than [`MAX_MEMBERS`] members.
const TOO_MANY: &str = "too many members";

pub(super) fn rejection(e: &serde_json::Error, otherwise: JwtRejection) -> JwtRejection {
    if e.to_string().starts_with(REPEATED) {
        JwtRejection::DuplicateMember
    } else {
        otherwise
    }
}

/// Puts a member's value in its slot, refusing a second one.
fn fill<T, E: de::Error>(slot: &mut Option<T>, value: T) -> Result<(), E> {
    match slot {
        Some(_) => Err(E::custom(REPEATED)),
        None => {
            *slot = Some(value);
            Ok(())
        }
    }
}

/// Skips the value of a member paygate does not read, after checking that its name was not
/// seen before and that objects inside it repeat nothing either.
fn skip_other<'de, A: MapAccess<'de>>(
    map: &mut A,
    name: MemberName<'de>,
    others: &mut Vec<MemberName<'de>>,
) -> Result<(), A::Error> {
    // At most MAX_MEMBERS names to compare: a bounded number of comparisons per member.
    if others.len() >= MAX_MEMBERS {
        return Err(de::Error::custom(TOO_MANY));
    }
    if others.contains(&name) || !map.next_value::<UniqueMembers>()?.0 {
        return Err(de::Error::custom(REPEATED));
    }
    others.push(name);
    Ok(())
}

impl<'de> Deserialize<'de> for Header<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeaderVisitor;
        impl<'de> Visitor<'de> for HeaderVisitor {
            type Value = Header<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JOSE header object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Header<'de>, A::Error> {
                let (mut alg, mut typ, mut kid, mut crit) = (None, None, None, None);
                let mut others = Vec::new();
                while let Some(name) = map.next_key::<MemberName<'de>>()? {
                    match &*name.0 {
                        "alg" => fill(&mut alg, map.next_value::<MemberName<'de>>()?.0)?,
                        "typ" => fill(&mut typ, map.next_value::<MemberName<'de>>()?.0)?,
                        "kid" => fill(&mut kid, map.next_value::<MemberName<'de>>()?.0)?,
                        "crit" => fill(&mut crit, map.next_value::<UniqueMembers>()?)?,
                        _ => skip_other(&mut map, name, &mut others)?,
                    }
                }
                Ok(Header {
                    alg: alg.ok_or_else(|| de::Error::missing_field("alg"))?,
                    typ,
                    kid,
                    crit: crit.is_some(),
                })
            }
        }
        deserializer.deserialize_map(HeaderVisitor)
    }
}

impl<'de> Deserialize<'de> for Audience {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AudienceVisitor;
        impl<'de> Visitor<'de> for AudienceVisitor {
            type Value = Audience;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E>(self, aud: &str) -> Result<Audience, E> {
                Ok(Audience::One(aud.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Audience, A::Error> {
                let mut list = Vec::new();
                while let Some(aud) = seq.next_element::<String>()? {
                    list.push(aud);
                }
                Ok(Audience::Many(list))
            }
        }
        deserializer.deserialize_any(AudienceVisitor)
    }
}

impl<'de> Deserialize<'de> for Claims {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ClaimsVisitor;
        impl<'de> Visitor<'de> for ClaimsVisitor {
            type Value = Claims;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JWT claims object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Claims, A::Error> {
                let (mut iss, mut aud, mut sub, mut jti, mut amr) = (None, None, None, None, None);
                let (mut iat, mut nbf, mut exp) = (None, None, None);
                let mut others = Vec::new();
                while let Some(name) = map.next_key::<MemberName<'de>>()? {
                    match &*name.0 {
                        "iss" => fill(&mut iss, map.next_value::<String>()?)?,
                        "aud" => fill(&mut aud, map.next_value::<Audience>()?)?,
                        "sub" => fill(&mut sub, map.next_value::<String>()?)?,
                        "iat" => fill(&mut iat, map.next_value::<i64>()?)?,
                        "nbf" => fill(&mut nbf, map.next_value::<i64>()?)?,
                        "exp" => fill(&mut exp, map.next_value::<i64>()?)?,
                        "jti" => fill(&mut jti, map.next_value::<String>()?)?,
                        "amr" => fill(&mut amr, map.next_value::<Vec<String>>()?)?,
                        _ => skip_other(&mut map, name, &mut others)?,
                    }
                }
                let missing = de::Error::missing_field;
                Ok(Claims {
                    iss: iss.ok_or_else(|| missing("iss"))?,
                    aud: aud.ok_or_else(|| missing("aud"))?,
                    sub: sub.ok_or_else(|| missing("sub"))?,
                    iat: iat.ok_or_else(|| missing("iat"))?,
                    nbf: nbf.ok_or_else(|| missing("nbf"))?,
                    exp: exp.ok_or_else(|| missing("exp"))?,
                    jti: jti.ok_or_else(|| missing("jti"))?,
                    amr: amr.ok_or_else(|| missing("amr"))?,
                })
            }
        }
        deserializer.deserialize_map(ClaimsVisitor)
    }
}

/// Walks any JSON value; holds false if some object repeats a member name.
struct UniqueMembers(bool);

impl<'de> Deserialize<'de> for UniqueMembers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueMembersVisitor)
    }
}

struct UniqueMembersVisitor;

impl<'de> Visitor<'de> for UniqueMembersVisitor {
    type Value = UniqueMembers;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<UniqueMembers, E> {
        Ok(UniqueMembers(true))
    }
    fn visit_i64<E>(self, _: i64) -> Result<UniqueMembers, E> {
        Ok(UniqueMembers(true))
    }
    fn visit_u64<E>(self, _: u64) -> Result<UniqueMembers, E> {
        Ok(UniqueMembers(true))
    }
    fn visit_f64<E>(self, _: f64) -> Result<UniqueMembers, E> {
        Ok(UniqueMembers(true))
    }
    fn visit_str<E>(self, _: &str) -> Result<UniqueMembers, E> {
        Ok(UniqueMembers(true))
    }
    fn visit_unit<E>(self) -> Result<UniqueMembers, E> {
        Ok(UniqueMembers(true))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueMembers, A::Error> {
        let mut unique = true;
        while let Some(element) = seq.next_element::<UniqueMembers>()? {
            unique &= element.0;
        }
        Ok(UniqueMembers(unique))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueMembers, A::Error> {
        // Headers and claims have a handful of members: a list beats a hash set here, and
        // the cap keeps a hostile object from making the search quadratic.
        let mut seen: Vec<MemberName<'de>> = Vec::new();
        let mut unique = true;
        while let Some(name) = map.next_key::<MemberName<'de>>()? {
            if seen.len() >= MAX_MEMBERS {
                return Err(de::Error::custom(TOO_MANY));
            }
            unique &= !seen.contains(&name);
            unique &= map.next_value::<UniqueMembers>()?.0;
            seen.push(name);
        }
        Ok(UniqueMembers(unique))
    }
}

/// A member name, borrowed from the input unless it contains escapes.
#[derive(PartialEq, Eq)]
struct MemberName<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for MemberName<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = MemberName<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<MemberName<'de>, E> {
                Ok(MemberName(Cow::Borrowed(name)))
            }
            fn visit_str<E>(self, name: &str) -> Result<MemberName<'de>, E> {
                Ok(MemberName(Cow::Owned(name.to_owned())))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}
