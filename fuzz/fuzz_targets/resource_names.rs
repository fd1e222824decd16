//! Digest and ByteStream resource-name parsing (`buildkube-reapi`): whatever
//! a parser accepts prints back to the same text (trailing metadata aside)
//! and parses again to the same value; digests from the wire are accepted
//! exactly when their hash is 64 lowercase hex characters and their size is
//! not negative.
#![no_main]

use buildkube_proto::prost::Message as _;
use buildkube_proto::reapi;
use buildkube_reapi::{Digest, ReadResource, WriteResource};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        read_name(text);
        write_name(text);
        digest_text(text);
    }
    if let Ok(wire) = reapi::Digest::decode(data) {
        wire_digest(&wire);
    }
});

/// `name` is `canonical` or `canonical/` followed by metadata.
fn is_canonical_prefix(name: &str, canonical: &str) -> bool {
    name == canonical
        || name
            .strip_prefix(canonical)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn read_name(name: &str) {
    let Ok(read) = ReadResource::parse(name) else {
        return;
    };
    let canonical = ReadResource::format_with(&read.instance, &read.digest, read.compression);
    assert!(
        is_canonical_prefix(name, &canonical),
        "read name {name:?} parsed as {read:?}, which prints as {canonical:?}"
    );
    assert_eq!(ReadResource::parse(&canonical).as_ref(), Ok(&read));
}

fn write_name(name: &str) {
    let Ok(write) = WriteResource::parse(name) else {
        return;
    };
    assert!(!write.upload_id.is_empty() && !write.upload_id.contains('/'));
    let canonical = WriteResource::format_with(
        &write.instance,
        &write.upload_id,
        &write.digest,
        write.compression,
    );
    assert!(
        is_canonical_prefix(name, &canonical),
        "write name {name:?} parsed as {write:?}, which prints as {canonical:?}"
    );
    assert_eq!(WriteResource::parse(&canonical).as_ref(), Ok(&write));
}

fn digest_text(text: &str) {
    let Ok(digest) = text.parse::<Digest>() else {
        return;
    };
    assert_eq!(digest.to_string(), text, "`HASH/SIZE` text prints back");
    assert_eq!(Digest::try_from(&digest.to_proto()), Ok(digest));
}

fn wire_digest(wire: &reapi::Digest) {
    let valid_hash = wire.hash.len() == 64
        && wire
            .hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    match Digest::try_from(wire) {
        Ok(digest) => {
            assert!(valid_hash && wire.size_bytes >= 0, "{wire:?} accepted");
            assert_eq!(&digest.to_proto(), wire);
            assert_eq!(digest.size(), wire.size_bytes as u64);
            assert_eq!(digest.to_string().parse::<Digest>(), Ok(digest));
        }
        Err(error) => {
            assert!(
                !valid_hash || wire.size_bytes < 0,
                "{wire:?} refused: {error}"
            );
        }
    }
}
