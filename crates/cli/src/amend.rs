//! `strata amend`: change a qcow2 image's format options in place
//! (qemu-img amend): `-o compat=0.10|1.1,lazy_refcounts=on|off,
//! refcount_bits=N,size=SIZE`.
//!
//! Options are parsed as qemu-img parses them (`,,` is a literal comma,
//! later values override earlier ones, several `-o` are joined), with
//! qemu-img's messages for values it refuses and for options that only
//! `create` takes. The work is `strata_image::amend`: every refusal is
//! checked before anything is written. Like qemu-img, nothing is printed
//! on success; `-o help` lists the options.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use strata_image::amend::{amend_chain, AmendOptions, Compat};
use strata_image::Chain;

use crate::size::parse_size;
use crate::{open_options, NameFile};

/// Arguments of `strata amend`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AmendArgs {
    /// Image format; only qcow2 can be amended (probed when omitted).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Options to change, `name=value,...` (`-o help` lists them); may be
    /// given more than once.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Quiet: no warnings (a downgrade that drops bitmaps says so), no
    /// progress.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Progress, as qemu-img amend -p prints it (on stdout: 0 % once the
    /// image is open, 100 % when the amend ended, then a newline).
    #[arg(short = 'p')]
    pub progress: bool,
    /// The image.
    pub file: PathBuf,
}

/// The options `-o help` lists (qemu-img's amend options that Strata
/// takes; the others are refused with qemu-img's messages).
const HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image (must be the current one; use `strata rebase`)
  backing_fmt=<str>      - Image format of the base image (likewise)
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// Options only `create` takes: qemu-img names them so.
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "compression_type",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.format",
    "encrypt.hash-alg",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.key-secret",
    "encryption",
    "extended_l2",
    "extent_size_hint",
    "nocow",
    "preallocation",
];

/// qemu-img's amend options for encryption (Strata opens no encrypted
/// image, so they always fail as on an unencrypted one).
const ENCRYPT_AMEND: &[&str] = &[
    "encrypt.iter-time",
    "encrypt.keyslot",
    "encrypt.new-secret",
    "encrypt.old-secret",
    "encrypt.state",
];

/// What `-o` asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The amend options.
    pub opts: AmendOptions,
    /// `-o help` (or `?`) was given.
    pub help: bool,
    /// `data_file=NAME` (empty: remove the name), for images with an
    /// external data file.
    pub data_file: Option<String>,
    /// `data_file_raw=on|off`.
    pub data_file_raw: Option<bool>,
}

/// Splits `a=b,c=d` at commas not doubled (`,,` is a comma in a value).
fn split_items(spec: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(last) = items.last_mut() {
                    last.push(',');
                }
            } else {
                items.push(String::new());
            }
        } else if let Some(last) = items.last_mut() {
            last.push(c);
        }
    }
    items.into_iter().filter(|i| !i.is_empty()).collect()
}

fn on_off(k: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => bail!("Parameter '{k}' expects 'on' or 'off'"),
    }
}

/// Parses the `-o` strings as qemu-img does, with its messages.
pub fn parse_options(specs: &[String]) -> Result<Parsed> {
    let mut p = Parsed::default();
    let mut create_only: Option<String> = None;
    for spec in specs {
        for item in split_items(spec) {
            if item == "help" || item == "?" {
                p.help = true;
                continue;
            }
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                // A bare name is `name=on`, as in QEMU's option syntax.
                None => (item.clone(), "on".to_string()),
            };
            let o = &mut p.opts;
            match k.as_str() {
                "compat" => {
                    o.compat = Some(match Compat::parse(&v) {
                        Some(c) => c,
                        None => bail!("Unknown compatibility level {v}"),
                    })
                }
                "lazy_refcounts" => o.lazy_refcounts = Some(on_off(&k, &v)?),
                "refcount_bits" => {
                    let n = parse_number(&v)
                        .ok_or_else(|| anyhow::anyhow!("Parameter '{k}' expects a number"))?;
                    // Anything wider is refused by the amend itself.
                    o.refcount_bits = Some(u32::try_from(n).unwrap_or(u32::MAX));
                }
                "size" => {
                    o.size = Some(parse_size(&v).map_err(|_| {
                        anyhow::anyhow!(
                            "Parameter 'size' expects a non-negative number below 2^64\n\
                             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, \
                             tera-, peta-\nand exabytes, respectively."
                        )
                    })?)
                }
                "backing_file" => o.backing_file = Some(v),
                "backing_fmt" => o.backing_fmt = Some(v),
                // Checked against the image (strata-image qcow2/data_file.rs).
                "data_file" => p.data_file = Some(v),
                "data_file_raw" => p.data_file_raw = Some(on_off(&k, &v)?),
                k if ENCRYPT_AMEND.contains(&k) => {
                    bail!("Can't amend encryption options - encryption not present")
                }
                k if CREATE_ONLY.contains(&k) => {
                    create_only.get_or_insert_with(|| k.to_string());
                }
                k => bail!("Invalid parameter '{k}'"),
            }
        }
    }
    if let Some(k) = create_only {
        bail!("Invalid parameter '{k}'\nThis option is only supported for image creation");
    }
    Ok(p)
}

/// A number as QEMU's option parser reads it (decimal, or 0x hex).
fn parse_number(v: &str) -> Option<u64> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Runs `strata amend`.
pub fn run(args: &AmendArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<i32> {
    if args.options.is_empty() {
        bail!("Must specify options (-o)\nTry 'strata amend --help' for more info");
    }
    let progress = args.progress && !args.quiet;
    let mut started = false;
    let r = run_amend(args, out, err, progress, &mut started);
    // qemu-img's qemu_progress_end: 100 % when the amend began (whatever
    // its outcome), a newline in any case.
    if progress {
        if started {
            write!(out, "{}", progress_line(100.0))?;
        }
        writeln!(out)?;
    }
    r
}

/// qemu-img's progress line (`progress_simple_print`).
fn progress_line(percent: f64) -> String {
    format!("    ({percent:.2}/100%)\r")
}

/// Whether qemu-img reports this option error before its progress starts
/// (QemuOpts' own checks) rather than from the driver's amend, after.
fn refused_before_progress(e: &anyhow::Error) -> bool {
    let m = e.to_string();
    m.starts_with("Invalid parameter '") || m.starts_with("Parameter '")
}

fn run_amend(
    args: &AmendArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
    progress: bool,
    started: &mut bool,
) -> Result<i32> {
    let parsed = match parse_options(&args.options) {
        Ok(p) => p,
        Err(e) => {
            if progress && !refused_before_progress(&e) && args.file.exists() {
                write!(out, "{}", progress_line(0.0))?;
                *started = true;
            }
            return Err(e);
        }
    };
    if parsed.help {
        out.write_all(HELP.as_bytes())?;
        return Ok(0);
    }
    if let Some(f) = args.format.as_deref().filter(|f| *f != "qcow2") {
        bail!("Format driver '{f}' does not support option amendment");
    }
    let mut opts = open_options(args.format.as_deref(), false)?;
    opts.writable = true;
    // As qemu-img amend: a dirty image is repaired (the report says so),
    // unknown autoclear bits are cleared, unreadable bitmaps refused.
    opts.write_policy = strata_image::WritePolicy::qemu();
    let file = args.file.display().to_string();
    let mut chain = Chain::open(&args.file, &opts).name_file(&file)?;
    if progress {
        // The amend runs as one step: no intermediate values (qemu-img
        // prints its walks' progress; docs/qemu-iotests.md, skipped).
        write!(out, "{}", progress_line(0.0))?;
        *started = true;
    }
    // External data file options: refused (as qemu-img) before any change.
    let data_file_opts = parsed.data_file.is_some() || parsed.data_file_raw.is_some();
    if let Some(q) = chain.layers().first().and_then(|l| l.image.as_qcow2()) {
        q.check_data_file_amend(
            parsed.data_file.as_deref(),
            parsed.data_file_raw,
            parsed.opts.compat == Some(Compat::V2),
        )
        .name_file(&file)?;
    }
    let report = amend_chain(&mut chain, &parsed.opts).name_file(&file)?;
    if data_file_opts {
        if let Some(strata_image::Image::Qcow2(q)) =
            chain.layers_mut().first_mut().map(|l| &mut l.image)
        {
            q.amend_data_file(parsed.data_file.as_deref(), parsed.data_file_raw)
                .name_file(&file)?;
        }
    }
    if !args.quiet && !report.bitmaps_dropped.is_empty() {
        writeln!(
            err,
            "strata: warning: {file}: version 2 images cannot have persistent dirty bitmaps; \
             dropped: {}",
            report.bitmaps_dropped.join(", ")
        )?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[&str]) -> Result<Parsed> {
        parse_options(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_parse_like_qemu_img() {
        let p = parse(&[
            "compat=0.10,lazy_refcounts=off",
            "refcount_bits=0x10,size=1M",
        ])
        .unwrap();
        assert_eq!(p.opts.compat, Some(Compat::V2));
        assert_eq!(p.opts.lazy_refcounts, Some(false));
        assert_eq!(p.opts.refcount_bits, Some(16));
        assert_eq!(p.opts.size, Some(1 << 20));
        // Later values win; `,,` is a comma.
        let p = parse(&["compat=v2,compat=v3,backing_file=a,,b"]).unwrap();
        assert_eq!(p.opts.compat, Some(Compat::V3));
        assert_eq!(p.opts.backing_file.as_deref(), Some("a,b"));
        assert!(parse(&["help"]).unwrap().help);
    }

    #[test]
    fn refused_options_have_qemu_imgs_messages() {
        let msg = |s: &str| parse(&[s]).unwrap_err().to_string();
        assert_eq!(msg("compat=0.9"), "Unknown compatibility level 0.9");
        assert_eq!(
            msg("lazy_refcounts=maybe"),
            "Parameter 'lazy_refcounts' expects 'on' or 'off'"
        );
        assert_eq!(
            msg("refcount_bits=x"),
            "Parameter 'refcount_bits' expects a number"
        );
        assert_eq!(msg("foo=1"), "Invalid parameter 'foo'");
        assert_eq!(
            msg("cluster_size=4k"),
            "Invalid parameter 'cluster_size'\nThis option is only supported for image creation"
        );
        // The data file options are checked against the image
        // (crates/cli/tests/amend.rs, crates/cli/tests/data_file.rs).
        let p = parse(&["data_file_raw=off,data_file=x.data"]).unwrap();
        assert_eq!(p.data_file_raw, Some(false));
        assert_eq!(p.data_file.as_deref(), Some("x.data"));
    }
}
