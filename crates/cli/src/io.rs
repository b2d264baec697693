//! `strata io`: a qemu-io subset for scripts and tests. Commands (`-c`)
//! run in order on the image opened read-write: `read [-P pattern] off
//! len`, `write [-P pattern | -z [-u]] off len`, `discard off len`,
//! `flush`. The first failing command stops the run (nonzero exit); the
//! image is flushed at the end either way.

use std::io::Write;

use anyhow::{anyhow, bail, Context, Result};
use strata_image::Chain;

use crate::size::parse_size;
use crate::{open_options, NameFile};

/// Largest buffer used for one read or write (longer requests are split).
const CHUNK: u64 = 4 << 20;

/// Arguments of `strata io`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct IoArgs {
    /// Image format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// A command: read [-P pat] off len, write [-P pat | -z [-u]] off len,
    /// discard off len, flush.
    #[arg(short = 'c')]
    pub commands: Vec<String>,
    /// The image.
    pub file: std::path::PathBuf,
}

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoCommand {
    /// `read [-P pattern] off len`.
    Read {
        /// Expected byte, if any.
        pattern: Option<u8>,
        /// Guest offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// `write [-P pattern] off len` (pattern 0xcd by default, as qemu-io).
    Write {
        /// Byte written.
        pattern: u8,
        /// Guest offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// `write -z [-u] off len`.
    WriteZeroes {
        /// Deallocate where possible (`-u`).
        unmap: bool,
        /// Guest offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// `discard off len`.
    Discard {
        /// Guest offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// `flush`.
    Flush,
}

/// qemu-io's numbers: plain bytes, hex `0x...`, or a size with a suffix.
pub fn parse_num(s: &str) -> Result<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| anyhow!("invalid number {s:?}"));
    }
    parse_size(s)
}

fn parse_pattern(s: &str) -> Result<u8> {
    let v = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16)
    } else {
        s.parse::<u64>()
    }
    .map_err(|_| anyhow!("invalid pattern {s:?}"))?;
    u8::try_from(v).map_err(|_| anyhow!("invalid pattern {s:?}: not a byte"))
}

/// Parses one qemu-io command line.
pub fn parse_command(line: &str) -> Result<IoCommand> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&name, rest)) = words.split_first() else {
        bail!("empty command");
    };
    let mut pattern = None;
    let (mut zero, mut unmap) = (false, false);
    let mut pos = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        match rest[i] {
            "-P" => {
                i += 1;
                let v = rest
                    .get(i)
                    .ok_or_else(|| anyhow!("{name}: -P needs a pattern"))?;
                pattern = Some(parse_pattern(v)?);
            }
            "-z" => zero = true,
            "-u" => unmap = true,
            "-q" => {}
            f if f.starts_with('-') && f.len() > 1 && !f[1..].starts_with(char::is_numeric) => {
                bail!("{name}: unsupported flag {f}")
            }
            a => pos.push(a),
        }
        i += 1;
    }
    let off_len = |pos: &[&str]| -> Result<(u64, u64)> {
        match pos {
            [o, l] => Ok((parse_num(o)?, parse_num(l)?)),
            _ => bail!("{name}: expected an offset and a length"),
        }
    };
    let simple = |ok: bool| -> Result<()> {
        if ok {
            Ok(())
        } else {
            bail!("{name}: unsupported flags")
        }
    };
    Ok(match name {
        "read" => {
            simple(!zero && !unmap)?;
            let (off, len) = off_len(&pos)?;
            IoCommand::Read { pattern, off, len }
        }
        "write" => {
            let (off, len) = off_len(&pos)?;
            if zero {
                simple(pattern.is_none())?;
                IoCommand::WriteZeroes { unmap, off, len }
            } else {
                simple(!unmap)?;
                IoCommand::Write {
                    pattern: pattern.unwrap_or(0xcd),
                    off,
                    len,
                }
            }
        }
        "discard" | "aio_discard" => {
            simple(pattern.is_none() && !zero && !unmap)?;
            let (off, len) = off_len(&pos)?;
            IoCommand::Discard { off, len }
        }
        "flush" => {
            simple(pos.is_empty() && pattern.is_none() && !zero && !unmap)?;
            IoCommand::Flush
        }
        _ => bail!("unknown command {name:?} (strata io knows read, write, discard, flush)"),
    })
}

fn check_range(chain: &Chain, off: u64, len: u64) -> Result<()> {
    let size = chain.virtual_size();
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => bail!("request {off}+{len} is past the end of the image (size {size})"),
    }
}

/// Runs one command, printing qemu-io's line.
pub fn execute(chain: &mut Chain, cmd: &IoCommand, out: &mut dyn Write) -> Result<()> {
    match *cmd {
        IoCommand::Read { pattern, off, len } => {
            check_range(chain, off, len)?;
            let mut buf = vec![0u8; len.min(CHUNK) as usize];
            let mut done = 0;
            let mut bad: Option<u64> = None;
            while done < len {
                let n = (len - done).min(CHUNK) as usize;
                chain.read_at(&mut buf[..n], off + done)?;
                if let Some(p) = pattern {
                    if bad.is_none() {
                        if let Some(i) = buf[..n].iter().position(|&b| b != p) {
                            bad = Some(done + i as u64);
                        }
                    }
                }
                done += n as u64;
            }
            if bad.is_some() {
                // qemu-io names the request, not the first bad byte.
                bail!("Pattern verification failed at offset {off}, {len} bytes");
            }
            writeln!(out, "read {len}/{len} bytes at offset {off}")?;
        }
        IoCommand::Write { pattern, off, len } => {
            check_range(chain, off, len)?;
            let buf = vec![pattern; len.min(CHUNK) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(CHUNK) as usize;
                chain.write_at(&buf[..n], off + done)?;
                done += n as u64;
            }
            writeln!(out, "wrote {len}/{len} bytes at offset {off}")?;
        }
        IoCommand::WriteZeroes { unmap, off, len } => {
            check_range(chain, off, len)?;
            chain.write_zeroes(off, len, unmap)?;
            writeln!(out, "wrote {len}/{len} bytes at offset {off}")?;
        }
        IoCommand::Discard { off, len } => {
            check_range(chain, off, len)?;
            chain.discard(off, len)?;
            writeln!(out, "discard {len}/{len} bytes at offset {off}")?;
        }
        IoCommand::Flush => chain.flush()?,
    }
    Ok(())
}

/// Runs `strata io`.
pub fn run(args: &IoArgs, out: &mut dyn Write) -> Result<i32> {
    let file = args.file.display().to_string();
    let file = file.as_str();
    let cmds = args
        .commands
        .iter()
        .map(|c| parse_command(c).with_context(|| format!("{file}: {c:?}")))
        .collect::<Result<Vec<_>>>()?;
    let mut opts = open_options(args.format.as_deref(), false)?;
    opts.writable = true;
    // As qemu-io / qemu-img open an image read-write: a dirty image is
    // repaired, unknown autoclear bits are cleared, unreadable bitmaps refused.
    opts.write_policy = strata_image::WritePolicy::qemu();
    let mut chain = Chain::open(&args.file, &opts).name_file(file)?;
    let mut failure = None;
    for (cmd, text) in cmds.iter().zip(&args.commands) {
        if let Err(e) = execute(&mut chain, cmd, out) {
            failure = Some(anyhow!("{file}: {text:?}: {e:#}"));
            break;
        }
        out.flush()?;
    }
    let flushed = chain
        .flush()
        .with_context(|| format!("{file}: flush failed"));
    if let Some(e) = failure {
        return Err(e);
    }
    flushed?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_io_commands_parse() {
        assert_eq!(
            parse_command("write -P 0xab 64k 4k").unwrap(),
            IoCommand::Write {
                pattern: 0xab,
                off: 65536,
                len: 4096
            }
        );
        assert_eq!(
            parse_command("write -z -u 0x1000 512").unwrap(),
            IoCommand::WriteZeroes {
                unmap: true,
                off: 4096,
                len: 512
            }
        );
        assert_eq!(
            parse_command("read -P 17 1M 1M").unwrap(),
            IoCommand::Read {
                pattern: Some(17),
                off: 1 << 20,
                len: 1 << 20
            }
        );
        assert_eq!(parse_command("flush").unwrap(), IoCommand::Flush);
        for bad in ["", "frob 0 1", "write 0", "write -P 300 0 1", "read -z 0 1"] {
            assert!(parse_command(bad).is_err(), "{bad:?}");
        }
    }
}
