//! The libvirt commands of the command line, on libvirt's in-process test
//! driver: virsh's spelling (the options the seed and virsh's manual use),
//! and the per-domain lock seen from another process.
#![cfg(feature = "libvirt")]

mod common;

use std::path::Path;

use common::*;

fn strata_ok(args: &[&str]) -> Run {
    let r = strata(args);
    assert_eq!(r.code, 0, "strata {args:?}: {}{}", r.stdout, r.stderr);
    r
}

/// A test-driver domain "vm" with qcow2 vda, raw vdb and a cdrom, in a
/// directory with a space in its name; returns (URI, directory).
fn test_domain(dir: &Path) -> (String, std::path::PathBuf) {
    let dir = std::fs::canonicalize(dir).unwrap().join("vm disks");
    std::fs::create_dir(&dir).unwrap();
    let disk = dir.join("vm.qcow2");
    strata_ok(&["create", "-q", s(&disk), "16M"]);
    strata_ok(&["io", "-c", "write -P 0x11 0 1M", s(&disk)]);
    let data = dir.join("data.raw");
    std::fs::write(&data, vec![0u8; 1 << 20]).unwrap();
    let devices = format!(
        "{}<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vdb' bus='virtio'/></disk>\
         <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>\
         <target dev='hdc' bus='ide'/><readonly/></disk>",
        qcow2_disk_xml(&disk, "vda"),
        data.display()
    );
    // The URI cannot have a space: node.xml goes one level up.
    (test_driver_uri(dir.parent().unwrap(), &devices), dir)
}

#[test]
fn snapshot_create_takes_virshs_options() {
    let d = tempdir();
    let (uri, dir) = test_domain(d.path());
    let u = uri.as_str();
    let file = dir.join("vm take 1.qcow2");
    let spec = format!("vda,snapshot=external,file={}", file.display());
    // -c before the subcommand, as `virsh -c URI snapshot-create-as`.
    let r = strata_ok(&[
        "-c",
        u,
        "snapshot",
        "create",
        "--domain",
        "vm",
        "--name",
        "take-1",
        "--description",
        "first",
        "--disk-only",
        "--atomic",
        "--diskspec",
        &spec,
        "--diskspec",
        "vdb,snapshot=no",
    ]);
    assert!(
        r.stdout.contains("Domain snapshot take-1 created"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("Disk vdb skipped: snapshot=no"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("Disk hdc skipped: a cdrom device"),
        "{}",
        r.stdout
    );
    assert!(file.exists());
    assert!(!dir.join("data.take-1").exists());

    let q = strata(&["snapshot", "create", "vm", "take-2", "--quiesce", "-c", u]);
    assert_fails_with(&q, 1, &["--quiesce", "guest agent"]);
    assert!(!dir.join("vm take 1.take-2").exists(), "nothing was made");
}

#[test]
fn snapshot_list_current_info_dumpxml_as_virsh() {
    let d = tempdir();
    let (uri, _) = test_domain(d.path());
    let u = uri.as_str();
    strata_ok(&["snapshot", "create", "vm", "take-1", "-c", u]);
    strata_ok(&["snapshot", "create", "vm", "take-2", "-c", u]);

    let l = strata_ok(&["snapshot", "list", "vm", "--parent", "-c", u]).stdout;
    let head = l.lines().next().unwrap();
    assert!(head.contains("Parent"), "{l}");
    let t2 = l.lines().find(|l| l.contains("take-2")).unwrap();
    assert!(t2.trim_end().ends_with("take-1"), "{l}");
    let roots = strata_ok(&["snapshot", "list", "vm", "--roots", "--name", "-c", u]).stdout;
    assert_eq!(roots.trim(), "take-1");
    let leaves = strata_ok(&["snapshot", "list", "vm", "--leaves", "--name", "-c", u]).stdout;
    assert_eq!(leaves.trim(), "take-2");

    let cur = strata_ok(&["snapshot", "current", "vm", "--name", "-c", u]).stdout;
    assert_eq!(cur.trim(), "take-2");
    let info = strata_ok(&["snapshot", "info", "vm", "--current", "-c", u]).stdout;
    assert!(info.contains("Name:           take-2"), "{info}");
    assert!(info.contains("Parent:         take-1"), "{info}");
    assert!(info.contains("Location:       external"), "{info}");
    let xml = strata_ok(&["snapshot", "dumpxml", "vm", "take-1", "-c", u]).stdout;
    assert!(xml.contains("<name>take-1</name>"), "{xml}");
}

/// Shuts the test driver's domain "vm" off again (the CLI keeps test:
/// connections per thread, so this talks to the same driver state).
fn stop(uri: &str) {
    let r = strata(&["snapshot", "list", "vm", "-c", uri]);
    assert_eq!(r.code, 0);
    strata_cli::snapshot::with_connection(Some(uri), |conn| {
        virt::domain::Domain::lookup_by_name(conn, "vm")?.destroy()?;
        Ok(())
    })
    .unwrap();
}

#[test]
fn revert_and_delete_take_virshs_options() {
    let d = tempdir();
    let (uri, _) = test_domain(d.path());
    let u = uri.as_str();
    strata_ok(&["snapshot", "create", "vm", "take-1", "-c", u]);
    strata_ok(&["snapshot", "create", "vm", "take-2", "-c", u]);
    strata_ok(&["snapshot", "create", "vm", "take-3", "-c", u]);

    strata_ok(&["snapshot", "revert", "vm", "--current", "-c", u]);
    let cur = strata_ok(&["snapshot", "current", "vm", "--name", "-c", u]).stdout;
    assert_eq!(cur.trim(), "take-3");

    let r = strata_ok(&["snapshot", "revert", "vm", "take-3", "--running", "-c", u]);
    assert!(r.stdout.contains("Domain vm started"), "{}", r.stdout);
    // Running: a revert without --force is refused; a delete is libvirt's
    // live job, which the test driver does not have (nothing changes).
    let busy = strata(&["snapshot", "revert", "vm", "take-3", "-c", u]);
    assert_fails_with(&busy, 1, &["running", "--force"]);
    let busy = strata(&["snapshot", "delete", "vm", "take-3", "-c", u]);
    assert_fails_with(&busy, 1, &["not supported"]);
    // --force stops it, reverts, and --running starts it again.
    let r = strata_ok(&[
        "snapshot",
        "revert",
        "vm",
        "take-3",
        "--force",
        "--running",
        "-c",
        u,
    ]);
    assert!(
        r.stdout
            .contains("Domain vm was running: stopped it (--force)")
            && r.stdout.contains("Domain vm reverted to snapshot take-3")
            && r.stdout.contains("Domain vm started"),
        "{}",
        r.stdout
    );
    let dom = strata_ok(&["snapshot", "current", "vm", "--name", "-c", u]).stdout;
    assert_eq!(dom.trim(), "take-3");
    stop(&uri);

    let r = strata_ok(&[
        "snapshot",
        "delete",
        "vm",
        "take-1",
        "--children-only",
        "-c",
        u,
    ]);
    assert!(
        r.stdout.contains("Domain snapshot take-3 deleted"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("Domain snapshot take-2 deleted"),
        "{}",
        r.stdout
    );
    let names = strata_ok(&["snapshot", "list", "vm", "--name", "-c", u]).stdout;
    assert_eq!(names.trim(), "take-1");

    let r = strata_ok(&[
        "snapshot",
        "delete",
        "--domain",
        "vm",
        "--current",
        "--metadata",
        "-c",
        u,
    ]);
    assert!(
        r.stdout.contains("Kept "),
        "the files are named: {}",
        r.stdout
    );
    let names = strata_ok(&["snapshot", "list", "vm", "--name", "-c", u]).stdout;
    assert_eq!(names.trim(), "");
}

#[test]
fn blockcommit_and_blockpull_take_virshs_positional_disk_and_options() {
    let d = tempdir();
    let (uri, dir) = test_domain(d.path());
    let u = uri.as_str();
    strata_ok(&["snapshot", "create", "vm", "take-1", "-c", u]);
    strata_ok(&["snapshot", "create", "vm", "take-2", "-c", u]);
    let top = dir.join("vm.take-2");

    let inner = dir.join("vm.take-1");
    let bad = strata(&["blockcommit", "vm", "vda", "--top", s(&inner), "-c", u]);
    assert_fails_with(&bad, 1, &["--top", "active image only"]);

    let r = strata_ok(&[
        "blockcommit",
        "vm",
        s(&top),
        "--active",
        "--pivot",
        "--shallow",
        "--wait",
        "--verbose",
        "--delete-snapshots",
        "-c",
        u,
    ]);
    assert!(
        r.stdout.contains("Successfully committed and pivoted"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains(&format!("Disk vda now uses {}", inner.display())),
        "--shallow commits into the immediate backing file: {}",
        r.stdout
    );

    let r = strata_ok(&[
        "blockpull",
        "vm",
        "--path",
        "vda",
        "--wait",
        "--verbose",
        "-c",
        u,
    ]);
    assert!(r.stdout.contains("Block pull complete"), "{}", r.stdout);
    let info = qemu_img_ok(&["info", "-U", s(&inner)]);
    assert!(!info.contains("backing file:"), "{info}");
}

#[test]
fn connect_after_the_subcommand_works_and_before_other_commands_is_left_alone() {
    // Only the parsing is checked here: -c given after the subcommand
    // wins, and a -c before a non-libvirt command is left alone.
    let d = tempdir();
    let (uri, _) = test_domain(d.path());
    let r = strata_ok(&["snapshot", "list", "vm", "--name", "-c", &uri]);
    assert_eq!(r.stdout.trim(), "");
    let r = strata(&["-c", &uri, "info", "nonexistent.qcow2"]);
    assert_ne!(r.code, 0);
}

#[test]
fn an_operation_in_another_process_is_refused_while_the_domain_is_locked() {
    let d = tempdir();
    let (uri, dir) = test_domain(d.path());
    let xml_before = std::fs::read_to_string(dir.parent().unwrap().join("node.xml")).unwrap();
    strata_cli::snapshot::with_connection(Some(&uri), |conn| {
        let _held = strata_libvirt::testing::lock_domain(conn, "vm")?;
        // The strata binary: another process, another open file description.
        let r = strata_bin(&["snapshot", "create", "vm", "take-1", "-c", &uri]);
        assert_fails_with(
            &r,
            1,
            &["busy", "another Strata operation", "nothing was changed"],
        );
        assert!(!dir.join("vm.take-1").exists());
        Ok(())
    })
    .unwrap();
    let after = std::fs::read_to_string(dir.parent().unwrap().join("node.xml")).unwrap();
    assert_eq!(after, xml_before);
    // Released with the guard.
    let r = strata_bin(&["snapshot", "create", "vm", "take-1", "-c", &uri]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// A blockcommit into a base on a full filesystem (a 3 MiB tmpfs mounted
/// in a private mount namespace, so nothing outlives the test): the error
/// names the merge, what state each file is in and what to run next; the
/// active image still reads the same and the base checks clean.
/// Needs root (mount); skipped only with STRATA_SKIP_LIBVIRTD_TESTS=1.
#[test]
fn a_blockcommit_on_a_full_filesystem_says_what_state_each_file_is_in() {
    let d = tempdir();
    let w = std::fs::canonicalize(d.path()).unwrap();
    std::fs::create_dir(w.join("small")).unwrap();
    let script = format!(
        r#"set -e
W='{w}'
mount -t tmpfs -o size=3M tmpfs "$W/small" || {{ echo NO-MOUNT; exit 0; }}
qemu-img create -q -f qcow2 "$W/small/test.qcow2" 16M
qemu-img create -q -f qcow2 -b "$W/small/test.qcow2" -F qcow2 "$W/top.qcow2"
qemu-io -c "write -P 0x22 0 6M" "$W/top.qcow2" >/dev/null
qemu-img convert -O raw "$W/top.qcow2" "$W/before.raw"
cat > "$W/node.xml" <<X
<node><domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'><name>vm</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid><memory>65536</memory><os><type>hvm</type></os><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$W/top.qcow2'/><target dev='vda' bus='virtio'/></disk></devices><test:runstate>5</test:runstate></domain></node>
X
if '{bin}' blockcommit vm -c "test://$W/node.xml" 2>"$W/err"; then echo COMMIT-SUCCEEDED; fi
echo "ERR: $(cat "$W/err")"
qemu-img convert -O raw "$W/top.qcow2" "$W/after.raw"
cmp -s "$W/before.raw" "$W/after.raw" && echo TOP-READS-THE-SAME
qemu-img check -q "$W/small/test.qcow2" && echo BASE-CHECKS-CLEAN
rm -f "$W/before.raw" "$W/after.raw" "$W/err"
"#,
        w = w.display(),
        bin = env!("CARGO_BIN_EXE_strata"),
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "bash", "-c", &script])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || text.contains("NO-MOUNT") {
        if std::env::var("STRATA_SKIP_LIBVIRTD_TESTS").is_ok_and(|v| v == "1") {
            eprintln!("SKIPPED (STRATA_SKIP_LIBVIRTD_TESTS=1): cannot mount a tmpfs: {text}");
            return;
        }
        panic!("needs root to mount a small tmpfs in a private namespace: {text}");
    }
    assert!(!text.contains("COMMIT-SUCCEEDED"), "{text}");
    for needle in [
        "blockcommit: commit ",
        " failed: ",
        "No space left on device",
        "top.qcow2, which is unchanged and reads the same",
        "test.qcow2 may be partly written",
        "libvirt's metadata is unchanged",
        "run the same blockcommit again",
    ] {
        assert!(text.contains(needle), "{needle:?} in {text}");
    }
    assert!(text.contains("TOP-READS-THE-SAME"), "{text}");
    assert!(text.contains("BASE-CHECKS-CLEAN"), "{text}");
}

/// A real private libvirtd and QEMU (the booted-guest harness's), for the
/// live commands.
#[path = "../../libvirt/tests/guest/mod.rs"]
mod guest;

/// SIGTERM to `strata blockcommit` while libvirt's live job runs (slowed
/// by a bandwidth limit): the job is aborted, the running domain keeps a
/// valid chain, and the next blockcommit succeeds.
#[test]
fn an_interrupted_live_blockcommit_leaves_a_valid_chain_and_the_next_one_succeeds() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let Some(lv) = guest::Libvirtd::start() else {
        return;
    };
    let work = tempdir();
    let dir = std::fs::canonicalize(work.path()).unwrap();
    let base = dir.join("intr.qcow2");
    guest::qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "16M"]);
    guest::qemu_io(&base, "qcow2", "write -P 0x11 0 2M");
    let xml = dir.join("intr.xml");
    std::fs::write(
        &xml,
        format!(
            "<domain type='qemu'><name>intr</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>\
             <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             <memballoon model='none'/></devices></domain>",
            base.display()
        ),
    )
    .unwrap();
    lv.virsh(&["define", s(&xml)]);
    lv.virsh(&["start", "--paused", "intr"]);
    let u = lv.uri.as_str();
    let r = strata_ok(&[
        "-c",
        u,
        "snapshot",
        "create",
        "intr",
        "take-1",
        "--disk-only",
        "--atomic",
    ]);
    assert!(
        r.stdout.contains("Domain snapshot take-1 created"),
        "{}",
        r.stdout
    );
    let top = dir.join("intr.take-1");
    assert!(lv.virsh(&["domblklist", "intr"]).contains(s(&top)));
    let dev = "/machine/peripheral/virtio-disk0/virtio-backend";
    lv.virsh(&[
        "qemu-monitor-command",
        "intr",
        "--hmp",
        &format!("qemu-io -d {dev} \"write -P 0x22 0 4M\""),
    ]);
    lv.virsh(&[
        "qemu-monitor-command",
        "intr",
        "--hmp",
        &format!("qemu-io -d {dev} \"flush\""),
    ]);
    let before = guest::sha256_view(&top, &dir);

    let child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "-c",
            u,
            "blockcommit",
            "intr",
            "vda",
            "--active",
            "--pivot",
            "--verbose",
        ])
        .args(["--bandwidth", "65536", "--bytes", "--delete-snapshots"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let jobs = lv
            .try_virsh(&["blockjob", "intr", "vda"])
            .unwrap_or_default();
        if jobs.contains("Commit") || jobs.contains("Bandwidth") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no job started: {jobs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let t1 = Instant::now();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cancelled"), "{err}");
    assert!(
        t1.elapsed() < Duration::from_secs(20),
        "the abort took {:?}",
        t1.elapsed()
    );
    // The domain runs on the same chain, with no job left.
    assert_eq!(lv.state("intr"), "paused");
    let jobs = lv.virsh(&["blockjob", "intr", "vda"]);
    assert!(
        !jobs.contains("Commit") && !jobs.contains("Bandwidth"),
        "{jobs}"
    );
    assert!(lv.virsh(&["domblklist", "intr"]).contains(s(&top)));
    assert!(lv
        .virsh(&["dumpxml", "--inactive", "intr"])
        .contains(s(&top)));
    guest::qemu_img(&["check", "-U", s(&top)]);
    assert_eq!(guest::sha256_view(&top, &dir), before);
    assert!(lv
        .virsh(&["snapshot-list", "intr", "--name"])
        .contains("take-1"));

    // The next operation succeeds.
    let r = strata_ok(&[
        "-c",
        u,
        "blockcommit",
        "intr",
        "vda",
        "--active",
        "--pivot",
        "--delete-snapshots",
    ]);
    assert!(r.stdout.contains("pivoted"), "{}", r.stdout);
    assert!(lv.virsh(&["domblklist", "intr"]).contains(s(&base)));
    assert!(!top.exists(), "the committed overlay is removed");
    lv.virsh(&["destroy", "intr"]);
    assert_eq!(guest::sha256_view(&base, &dir), before);
    lv.virsh(&["undefine", "intr"]);
}

#[test]
fn revert_of_a_memory_snapshot_restores_it_and_disks_only_drops_it() {
    let Some(lv) = guest::Libvirtd::start() else {
        return;
    };
    let work = tempdir();
    let dir = std::fs::canonicalize(work.path()).unwrap();
    let base = dir.join("memv.qcow2");
    guest::qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "16M"]);
    let xml = dir.join("memv.xml");
    std::fs::write(
        &xml,
        format!(
            "<domain type='qemu'><name>memv</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>\
             <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             <memballoon model='none'/></devices></domain>",
            base.display()
        ),
    )
    .unwrap();
    lv.virsh(&["define", s(&xml)]);
    std::fs::remove_file(&xml).unwrap();
    lv.virsh(&["start", "memv"]);
    let mem = dir.join("memv.mem");
    lv.virsh(&[
        "snapshot-create-as",
        "memv",
        "m1",
        "--memspec",
        &format!("file={},snapshot=external", mem.display()),
        "--diskspec",
        "vda,snapshot=external",
    ]);
    let mem_bytes = std::fs::read(&mem).unwrap();
    let u = lv.uri.as_str();
    // Running: refused without --force.
    let busy = strata(&["-c", u, "snapshot", "revert", "memv", "m1"]);
    assert_ne!(busy.code, 0, "{}", busy.stdout);
    let r = strata_ok(&[
        "-c", u, "snapshot", "revert", "memv", "m1", "--force", "--paused",
    ]);
    assert!(
        r.stdout
            .contains("Domain memv was running: stopped it (--force)")
            && r.stdout.contains(&format!(
                "Domain memv restored from the memory state in {} (paused)",
                mem.display()
            )),
        "{}",
        r.stdout
    );
    assert_eq!(lv.state("memv"), "paused");
    assert!(
        std::fs::read(&mem).unwrap() == mem_bytes,
        "memory file untouched"
    );
    // --disks-only: the disks alone, the memory file kept and said.
    let r = strata_ok(&[
        "-c",
        u,
        "snapshot",
        "revert",
        "memv",
        "m1",
        "--force",
        "--disks-only",
    ]);
    assert!(
        !r.stdout.contains("restored from the memory state")
            && r.stdout.contains(&mem.display().to_string()),
        "{}",
        r.stdout
    );
    assert_eq!(lv.state("memv"), "shut off");
    assert!(
        std::fs::read(&mem).unwrap() == mem_bytes,
        "memory file untouched"
    );
}
