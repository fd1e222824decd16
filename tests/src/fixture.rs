//! What the fixture workspace `tests/fixtures/cc-workspace` builds, computed
//! here independently of Bazel, so that tests can check outputs byte for byte.
//!
//! | target | what it is |
//! | --- | --- |
//! | `//lib:greet` | `cc_library` of two `.cc`/`.h` pairs |
//! | `//app:hello` | `cc_binary` printing [`HELLO_STDOUT`] |
//! | `//app:greet_test` | `cc_test` (plain, exits non-zero on failure) |
//! | `//gen:many` | `genrule` with [`MANY_COUNT`] outputs, see [`many_contents`] |
//! | `//gen:blob_gen` | `cc_binary` writing a xorshift64 byte stream, see [`big_contents`] |
//! | `//gen:big` | `genrule` running `blob_gen` for one [`BIG_LEN`]-byte output |
//! | `//fail:broken` | `genrule` failing on purpose, tagged `manual` (not in `//...`) |
//! | `//slow` | [`SLOW_COUNT`] `genrule`s sleeping 2-4 s each, tagged `manual`, see [`slow_contents`] |

use anyhow::{bail, ensure, Context, Result};

use crate::bazel::Bazel;

/// Targets `bazel build //...` builds (the failing one excluded).
pub const ALL_TARGETS: &str = "//...";
/// The target that fails on purpose.
pub const BROKEN_TARGET: &str = "//fail:broken";
/// Exit code of [`BROKEN_TARGET`]'s command; Bazel prints it as `(Exit 3)`.
pub const BROKEN_EXIT_CODE: i32 = 3;
/// The line [`BROKEN_TARGET`]'s command writes to stderr.
pub const BROKEN_MESSAGE: &str = "buildkube-fixture: intentional failure (exit 3)";

/// What `bazel-bin/app/hello` prints.
pub const HELLO_STDOUT: &str = "hello from buildkube: 6 * 7 = 42\ntriangle(100) = 5050\n";
/// The test target, as a path under `bazel-testlogs/`.
pub const TEST_LOG: &str = "app/greet_test";
/// A line the test prints when it passes, found in its `test.log`.
pub const TEST_PASSED_LINE: &str = "greet_test: all passed";

/// Number of outputs of `//gen:many`.
pub const MANY_COUNT: usize = 120;
/// Size of `//gen:big`'s output: over 10 MiB and no multiple of any chunk size.
pub const BIG_LEN: usize = 10 * 1024 * 1024 + 12345;
/// `//gen:big`'s output under `bazel-bin/`.
pub const BIG_PATH: &str = "gen/big.bin";

/// The slow actions of the fault-injection tests; not in `//...`.
pub const SLOW_TARGET: &str = "//slow";
/// Number of genrules (one output each) under [`SLOW_TARGET`].
pub const SLOW_COUNT: usize = 12;

/// Path under `bazel-bin/` of the output of `//slow:slow_NN`.
pub fn slow_path(index: usize) -> String {
    format!("slow/out_{index:02}.txt")
}

/// Seconds `//slow:slow_NN` sleeps before writing its output.
pub fn slow_sleep_secs(index: usize) -> u64 {
    2 + (index % 3) as u64
}

/// Contents of `//slow:slow_NN`'s output: `slow NN`, then the lines 1 to NN.
pub fn slow_contents(index: usize) -> Vec<u8> {
    let mut text = format!("slow {index}\n");
    for line in 1..=index {
        text.push_str(&format!("{line}\n"));
    }
    text.into_bytes()
}

/// Path under `bazel-bin/` of output `index` of `//gen:many`.
pub fn many_path(index: usize) -> String {
    format!("gen/many/out_{index:03}.txt")
}

/// Contents of output `index` of `//gen:many`: `seq 1 index`, so the lines
/// `1` to `index`; output 0 is empty.
pub fn many_contents(index: usize) -> Vec<u8> {
    (1..=index)
        .map(|line| format!("{line}\n"))
        .collect::<String>()
        .into_bytes()
}

/// Contents of `//gen:big`'s output, as `gen/blob_gen.c` writes them: a
/// xorshift64 stream (state 0x9E3779B97F4A7C15, shifts 13, 7, 17), each state
/// as 8 little-endian bytes, cut at [`BIG_LEN`].
pub fn big_contents() -> Vec<u8> {
    let mut bytes = Vec::with_capacity(BIG_LEN + 8);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while bytes.len() < BIG_LEN {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    bytes.truncate(BIG_LEN);
    bytes
}

/// Checks every output of `bazel build //...`: the 120 files of `//gen:many`,
/// the bytes of `//gen:big`, and that `//app:hello` runs and prints [`HELLO_STDOUT`].
pub fn check_build_outputs(bazel: &Bazel) -> Result<()> {
    for index in 0..MANY_COUNT {
        let path = many_path(index);
        let actual = bazel.read_bin(&path)?;
        ensure_same_bytes(&path, &actual, &many_contents(index))?;
    }
    let big = bazel.read_bin(BIG_PATH)?;
    ensure_same_bytes(BIG_PATH, &big, &big_contents())?;

    let hello = bazel.bin_file("app/hello");
    let output = std::process::Command::new(&hello)
        .output()
        .with_context(|| format!("running {}", hello.display()))?;
    ensure!(
        output.status.success(),
        "{} exited with {}",
        hello.display(),
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        stdout == HELLO_STDOUT,
        "{} printed {stdout:?}, expected {HELLO_STDOUT:?}",
        hello.display()
    );
    Ok(())
}

/// Checks every output of `bazel build //slow` byte for byte.
pub fn check_slow_outputs(bazel: &Bazel) -> Result<()> {
    for index in 0..SLOW_COUNT {
        let path = slow_path(index);
        let actual = bazel.read_bin(&path)?;
        ensure_same_bytes(&path, &actual, &slow_contents(index))?;
    }
    Ok(())
}

/// Checks what `bazel test //...` leaves: the test's log shows it ran and passed.
pub fn check_test_outputs(bazel: &Bazel) -> Result<()> {
    let log = bazel.test_log(TEST_LOG)?;
    ensure!(
        log.lines().any(|line| line.trim() == TEST_PASSED_LINE),
        "the test log of {TEST_LOG} lacks `{TEST_PASSED_LINE}`:\n{log}"
    );
    Ok(())
}

/// Ok if `actual == expected`; else an error naming `what`, both sizes and
/// the first differing offset (the contents can be megabytes).
pub fn ensure_same_bytes(what: &str, actual: &[u8], expected: &[u8]) -> Result<()> {
    if actual == expected {
        return Ok(());
    }
    let first_difference = actual
        .iter()
        .zip(expected)
        .position(|(a, e)| a != e)
        .unwrap_or(actual.len().min(expected.len()));
    let around = |bytes: &[u8]| {
        let start = first_difference.saturating_sub(8);
        let end = (first_difference + 8).min(bytes.len());
        format!("{:02x?}", bytes.get(start..end).unwrap_or_default())
    };
    bail!(
        "{what}: {} bytes, expected {}; first difference at offset {first_difference}: \
         {} instead of {}",
        actual.len(),
        expected.len(),
        around(actual),
        around(expected)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_outputs() {
        assert_eq!(many_path(7), "gen/many/out_007.txt");
        assert_eq!(many_path(119), "gen/many/out_119.txt");
        assert!(many_contents(0).is_empty());
        assert_eq!(many_contents(3), b"1\n2\n3\n");
    }

    #[test]
    fn slow_outputs() {
        assert_eq!(slow_path(3), "slow/out_03.txt");
        assert_eq!(slow_contents(0), b"slow 0\n");
        assert_eq!(slow_contents(2), b"slow 2\n1\n2\n");
        assert_eq!((slow_sleep_secs(0), slow_sleep_secs(11)), (2, 4));
    }

    #[test]
    fn big_output_matches_what_blob_gen_wrote() {
        // First bytes of `blob_gen 10498105`, as built by Bazel and dumped with xxd.
        let big = big_contents();
        assert_eq!(big.len(), 10_498_105);
        assert_eq!(
            &big[..16],
            &[
                0xad, 0x4d, 0xf3, 0x0b, 0xae, 0x77, 0x1b, 0xdc, 0x76, 0x60, 0x6e, 0x02, 0xb9, 0xee,
                0xf0, 0x64
            ]
        );
    }

    #[test]
    fn differences_are_located() {
        ensure_same_bytes("same", b"abc", b"abc").unwrap();
        let err = ensure_same_bytes("x", b"abcd", b"abXd")
            .unwrap_err()
            .to_string();
        assert!(err.contains("first difference at offset 2"), "{err}");
        let err = ensure_same_bytes("x", b"ab", b"abc")
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 bytes, expected 3"), "{err}");
    }
}
