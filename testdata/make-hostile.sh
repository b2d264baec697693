#!/bin/bash
# Generate the hostile-image corpus in testdata/hostile/ (committed).
#
#   testdata/make-hostile.sh [OUTDIR]      (default: testdata/hostile)
#
# Starts from tiny clean images made by qemu-img/qemu-io (512-byte clusters,
# 256 KiB virtual disk: a data cluster, a zero cluster, a compressed
# cluster, data further in) and patches their bytes with python3 to make
# one crafted image per problem. Deterministic: random values come from a
# fixed seed, so regenerating with the same QEMU gives the same files.
#
# Also writes OUTDIR/EXPECT: one line per image, "name<TAB>outcome<TAB>text",
# where outcome is
#   open-error  Chain::open must fail, with `text` in the message;
#   opens       Chain::open must succeed (reads may still fail);
#   any         either, as long as nothing panics, hangs, balloons or writes.
# crates/image/tests/hostile.rs runs every image (see docs/hostile-images.md).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$HERE/hostile}
for tool in qemu-img qemu-io python3; do
    command -v "$tool" >/dev/null || { echo "$0: $tool not found" >&2; exit 1; }
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/*.qcow2 "$OUT"/*.raw "$OUT"/EXPECT
exec </dev/null
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Clean bases.
qemu-img create -q -f qcow2 -o cluster_size=512 "$WORK/base512.qcow2" 256K
qemu-io -f qcow2 "$WORK/base512.qcow2" \
    -c 'write -q -P 0x11 0 512' \
    -c 'write -q -z 512 512' \
    -c 'write -q -c -P 0x22 4096 512' \
    -c 'write -q -P 0x33 102400 1024' >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=512,compat=0.10 "$WORK/v2-512.qcow2" 64K
qemu-io -f qcow2 "$WORK/v2-512.qcow2" -c 'write -q -P 0x44 0 1024' >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=16k,extended_l2=on "$WORK/ext16k.qcow2" 64K
qemu-io -f qcow2 "$WORK/ext16k.qcow2" -c 'write -q -P 0x55 512 512' >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=512,compression_type=zstd "$WORK/zstd512.qcow2" 64K
qemu-io -f qcow2 "$WORK/zstd512.qcow2" -c 'write -q -c -P 0x66 0 512' >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=512 "$WORK/snap512.qcow2" 64K
qemu-img snapshot -c s1 "$WORK/snap512.qcow2"
# A raw disk whose guest wrote a qcow2 header naming a host file as its
# backing file (what probing would follow).
qemu-img create -q -f qcow2 -o cluster_size=512 -b /etc/hostname -F raw "$WORK/guest-header.qcow2" 64K

python3 - "$WORK" "$OUT" <<'PY'
import os, random, shutil, struct, sys
work, out = sys.argv[1], sys.argv[2]
rng = random.Random(20240601)
expect = []

def load(name):
    return bytearray(open(os.path.join(work, name), 'rb').read())

def save(name, data, outcome='any', text=''):
    with open(os.path.join(out, name), 'wb') as f:
        f.write(bytes(data))
    expect.append((name, outcome, text))

def be(fmt, data, off):
    return struct.unpack_from('>' + fmt, data, off)[0]

def put(fmt, data, off, v):
    struct.pack_into('>' + fmt, data, off, v)

base = load('base512.qcow2')
CS = 512
l1_off = be('Q', base, 40)
rt_off = be('Q', base, 48)
l2_off = be('Q', base, l1_off) & 0x00fffffffffffe00
rb_off = be('Q', base, rt_off) & ~0x1ff
# L2 entries: 0 data, 1 zero, 8 compressed (guest 4096), 200 data (guest 102400).
data_entry = be('Q', base, l2_off)
data_off = data_entry & 0x00fffffffffffe00
comp_entry = be('Q', base, l2_off + 8 * 8)
save('clean-v3-512.qcow2', base, 'opens')
save('clean-v2-512.qcow2', load('v2-512.qcow2'), 'opens')
save('clean-extended-l2.qcow2', load('ext16k.qcow2'), 'opens')
save('clean-zstd.qcow2', load('zstd512.qcow2'), 'opens')
save('clean-snapshot.qcow2', load('snap512.qcow2'), 'opens')

# --- every header field at 0 / max / random -----------------------------
fields = [('magic', 0, 'I'), ('version', 4, 'I'), ('backing_file_offset', 8, 'Q'),
          ('backing_file_size', 16, 'I'), ('cluster_bits', 20, 'I'), ('size', 24, 'Q'),
          ('crypt_method', 32, 'I'), ('l1_size', 36, 'I'), ('l1_table_offset', 40, 'Q'),
          ('refcount_table_offset', 48, 'Q'), ('refcount_table_clusters', 56, 'I'),
          ('nb_snapshots', 60, 'I'), ('snapshots_offset', 64, 'Q'),
          ('incompatible_features', 72, 'Q'), ('compatible_features', 80, 'Q'),
          ('autoclear_features', 88, 'Q'), ('refcount_order', 96, 'I'),
          ('header_length', 100, 'I')]
for name, off, fmt in fields:
    bits = 32 if fmt == 'I' else 64
    for tag, v in (('zero', 0), ('max', (1 << bits) - 1), ('random', rng.getrandbits(bits))):
        d = bytearray(base)
        put(fmt, d, off, v)
        save(f'field-{name}-{tag}.qcow2', d)
# The compression type byte.
for tag, v in (('max', 255), ('two', 2)):
    d = bytearray(base); d[104] = v
    save(f'field-compression_type-{tag}.qcow2', d, 'open-error', 'compression type')

# --- truncations -----------------------------------------------------------
for n in sorted({0, 3, 4, 23, 24, 71, 72, 103, 104, 111, 200, 511, l1_off, l1_off + 4,
                 rt_off, l2_off, l2_off + 100, data_off + 100, len(base) // 2, len(base) - 1}):
    save(f'truncated-at-{n}.qcow2', base[:n])

# --- L1 / L2 / refcount pointers ------------------------------------------------
def with_l1(tag, v, outcome='any', text=''):
    d = bytearray(base); put('Q', d, l1_off, v); save(f'l1-{tag}.qcow2', d, outcome, text)
with_l1('past-end', (1 << 40) | (1 << 63), 'opens')
with_l1('max-offset', 0x00fffffffffffe00)
with_l1('into-header', 0 | 512 * 0 | (1 << 63) | 512 * 0)  # offset 0: unallocated
with_l1('at-cluster0-plus', 512 | (1 << 63))  # the L2 "table" is whatever is at 512
with_l1('at-l1-itself', l1_off | (1 << 63))
with_l1('at-refcount-table', rt_off | (1 << 63))
with_l1('at-refcount-block', rb_off | (1 << 63))
with_l1('at-data', data_off | (1 << 63))
with_l1('unaligned', (l2_off + 8) | (1 << 63))
with_l1('reserved-bits', l2_off | 0x7f00000000000000)
d = bytearray(base)
for i in range(be('I', base, 36)):
    put('Q', d, l1_off + 8 * i, l2_off | (1 << 63))
save('l1-all-same-l2.qcow2', d, 'opens')

def with_l2(tag, idx, v, outcome='any', text=''):
    d = bytearray(base); put('Q', d, l2_off + 8 * idx, v); save(f'l2-{tag}.qcow2', d, outcome, text)
with_l2('data-past-end', 0, (1 << 40) | (1 << 63), 'opens')
with_l2('data-max-offset', 0, 0x00fffffffffffe00 | (1 << 63), 'opens')
with_l2('data-in-header', 0, 0 | 1 << 63, 'opens')  # offset 0 = unallocated
with_l2('data-at-l1', 0, l1_off | (1 << 63), 'opens')
with_l2('data-at-l2-itself', 0, l2_off | (1 << 63), 'opens')
with_l2('data-at-refcount-table', 0, rt_off | (1 << 63), 'opens')
with_l2('data-unaligned', 0, (data_off + 16) | (1 << 63), 'opens')
with_l2('reserved-bits', 0, data_off | 0x3f00000000000000, 'opens')
with_l2('zero-flag-past-end', 1, (1 << 45) | 1, 'opens')
d = bytearray(base)
for i in range(CS // 8):
    put('Q', d, l2_off + 8 * i, data_off | (1 << 63))
save('l2-all-same-cluster.qcow2', d, 'opens')

def with_rt(tag, v):
    d = bytearray(base); put('Q', d, rt_off, v); save(f'reftable-{tag}.qcow2', d)
with_rt('past-end', 1 << 40)
with_rt('into-header', 0x200 * 0 + 0x0)
with_rt('at-l1', l1_off)
with_rt('at-l2', l2_off)
with_rt('at-itself', rt_off)
with_rt('unaligned', rb_off + 8)
d = bytearray(base); d[rb_off:rb_off + CS] = b'\xff' * CS
save('refblock-all-max.qcow2', d)
d = bytearray(base); d[rb_off:rb_off + CS] = b'\x00' * CS
save('refblock-all-zero.qcow2', d)

# --- overlapping metadata -------------------------------------------------------
d = bytearray(base); put('Q', d, 48, l1_off); save('overlap-reftable-is-l1.qcow2', d)
d = bytearray(base); put('Q', d, 40, rt_off); save('overlap-l1-is-reftable.qcow2', d)
d = bytearray(base); put('Q', d, 40, 0x200 * 0 + 0); save('overlap-l1-at-zero.qcow2', d)
d = bytearray(base); put('Q', d, 40, l2_off); save('overlap-l1-is-l2.qcow2', d)
d = bytearray(base); put('I', d, 60, 1); put('Q', d, 64, l1_off); save('overlap-snapshots-at-l1.qcow2', d)
d = bytearray(base); put('I', d, 60, 1); put('Q', d, 64, 0x0); save('snapshots-at-zero.qcow2', d)

# --- compressed descriptors that lie --------------------------------------------
sector_bits = 9 - 8
shift = 62 - sector_bits
def comp(offset, extra_sectors):
    return (1 << 62) | (extra_sectors << shift) | offset
comp_off = comp_entry & ((1 << shift) - 1)
with_l2('compressed-past-end', 8, comp(1 << 45, 1), 'opens')
with_l2('compressed-max-sectors', 8, comp(comp_off, (1 << sector_bits) - 1), 'opens')
with_l2('compressed-at-header', 8, comp(0, 1), 'opens')
with_l2('compressed-at-l1', 8, comp(l1_off, 1), 'opens')
with_l2('compressed-odd-offset', 8, comp(comp_off + 3, 1), 'opens')
with_l2('compressed-max-offset', 8, comp((1 << shift) - 1, (1 << sector_bits) - 1), 'opens')
with_l2('compressed-and-copied', 8, comp_entry | (1 << 63), 'opens')
d = bytearray(base)
d[comp_off:comp_off + 64] = bytes(rng.getrandbits(8) for _ in range(64))
save('compressed-garbage.qcow2', d, 'opens')
d = bytearray(base); d[comp_off + 4:comp_off + 256] = b'\0' * 252
save('compressed-cut-short.qcow2', d, 'opens')
d = bytearray(base); put('Q', d, 72, be('Q', d, 72) | 8); d[104] = 1  # says zstd, holds deflate
save('compressed-wrong-algorithm.qcow2', d, 'opens')
# 64 KiB clusters: a descriptor may name up to 256 sectors; make it name all.
zs = load('zstd512.qcow2')
zl1 = be('Q', zs, 40); zl2 = be('Q', zs, zl1) & 0x00fffffffffffe00
d = bytearray(zs); d[be('Q', zs, zl2) & ((1 << shift) - 1):][:32]
zoff = be('Q', zs, zl2) & ((1 << shift) - 1)
d[zoff:zoff + 32] = bytes(rng.getrandbits(8) for _ in range(32))
save('compressed-zstd-garbage.qcow2', d, 'opens')

# --- extensions ----------------------------------------------------------------
hl = be('I', base, 100)
def with_ext(tag, exts, outcome='any', text=''):
    d = bytearray(base)
    area = b''.join(exts)
    d[hl:hl + len(area)] = area
    save(f'ext-{tag}.qcow2', d, outcome, text)
def ext(magic, length, data=b''):
    return struct.pack('>II', magic, length) + data
with_ext('length-max', [ext(0x12345678, 0xffffffff)], 'open-error', '')
with_ext('length-past-cluster', [ext(0x12345678, 480)], 'open-error', '')
with_ext('length-overflow-then-more', [ext(0x12345678, 0xfffffff8), ext(0, 0)], 'open-error', '')
with_ext('backing-format-max', [ext(0xe2792aca, 0xffffffff)], 'open-error', '')
with_ext('backing-format-bad-utf8', [ext(0xe2792aca, 4, b'\xff\xfe\xfd\xfc'), ext(0, 0)])
with_ext('feature-table-odd', [ext(0x6803f857, 50, b'\0' * 56), ext(0, 0)])
with_ext('bitmaps-short', [ext(0x23852875, 8, b'\0' * 8), ext(0, 0)])
with_ext('bitmaps-huge', [ext(0x23852875, 24, struct.pack('>IIQQ', 0xffffffff, 0, 1 << 62, 1 << 62)), ext(0, 0)])
with_ext('many-empty', [ext(0x0000abcd, 0)] * 40 + [ext(0, 0)])
with_ext('data-file', [ext(0x44415441, 8, b'/dev/sda'), ext(0, 0)])
with_ext('fde-huge', [ext(0x0537be77, 16, struct.pack('>QQ', 1 << 62, 1 << 62)), ext(0, 0)])
with_ext('no-end-marker', [ext(0x12345678, 8, b'A' * 8)] * 50)

# --- cluster_bits out of range ----------------------------------------------------
for v in (0, 1, 8, 22, 31, 32, 63, 64, 0xffffffff):
    d = bytearray(base); put('I', d, 20, v)
    save(f'cluster-bits-{v}.qcow2', d, 'open-error', 'cluster_bits')

# --- encryption, unknown features -------------------------------------------------
for v, tag in ((1, 'aes'), (2, 'luks'), (7, 'unknown')):
    d = bytearray(base); put('I', d, 32, v)
    save(f'encrypted-{tag}.qcow2', d, 'open-error', 'encrypted')
for bit in (5, 31, 63):
    d = bytearray(base); put('Q', d, 72, be('Q', d, 72) | (1 << bit))
    save(f'incompat-bit-{bit}.qcow2', d, 'open-error', f'bit {bit}')
# An unknown bit the image's own feature table names.
d = bytearray(base); put('Q', d, 72, be('Q', d, 72) | (1 << 9))
entry = bytes([0, 9]) + b'evil feature'.ljust(46, b'\0')
area = ext(0x6803f857, 48, entry) + ext(0, 0)
d[hl:hl + len(area)] = area
save('incompat-bit-9-named.qcow2', d, 'open-error', 'evil feature')
d = bytearray(base); put('Q', d, 72, be('Q', d, 72) | 2); save('corrupt-bit.qcow2', d, 'opens')
d = bytearray(base); put('Q', d, 72, be('Q', d, 72) | 4); save('external-data-bit.qcow2', d, 'open-error', 'external data')

# --- huge counts ---------------------------------------------------------------------
for tag, v in (('max', 0xffffffff), ('limit-plus-one', 32 * 1024 * 1024 // 8 + 1),
               ('at-limit', 32 * 1024 * 1024 // 8)):
    d = bytearray(base); put('I', d, 36, v); save(f'l1-size-{tag}.qcow2', d, 'open-error', 'L1')
for tag, v in (('max', 0xffffffff), ('limit-plus-one', 8 * 1024 * 1024 // CS + 1),
               ('at-limit', 8 * 1024 * 1024 // CS)):
    d = bytearray(base); put('I', d, 56, v); save(f'refcount-table-clusters-{tag}.qcow2', d, 'open-error', 'refcount table')
for tag, v in (('max', 0xffffffff), ('limit', 65536), ('some', 1000)):
    d = bytearray(base); put('I', d, 60, v); put('Q', d, 64, rb_off); save(f'nb-snapshots-{tag}.qcow2', d, 'open-error', 'snapshot')
for tag, v in (('2p62-plus-1', (1 << 62) + 1), ('max', (1 << 64) - 1)):
    d = bytearray(base); put('Q', d, 24, v); save(f'size-{tag}.qcow2', d, 'open-error', 'virtual size')
# Largest virtual size the L1 table allows (reads must stay bounded).
d = bytearray(base); put('Q', d, 24, be('I', base, 36) * (CS // 8) * CS); save('size-l1-allows.qcow2', d, 'opens')
snap = load('snap512.qcow2')
so = be('Q', snap, 64)
for tag, off, v, fmt in (('id-len-max', 12, 0xffff, 'H'), ('name-len-max', 14, 0xffff, 'H'),
                         ('extra-max', 36, 0xffffffff, 'I'), ('l1-size-max', 8, 0xffffffff, 'I'),
                         ('l1-past-end', 0, 1 << 50, 'Q')):
    d = bytearray(snap); put(fmt, d, so + off, v); save(f'snapshot-{tag}.qcow2', d)

# --- backing names -----------------------------------------------------------------------
def with_backing(fname, name, fmt=b'qcow2', outcome='open-error', text=''):
    d = bytearray(base)
    exts = ext(0xe2792aca, len(fmt), fmt + b'\0' * (-len(fmt) % 8)) if fmt else b''
    exts += ext(0, 0)
    d[hl:hl + len(exts)] = exts
    nb = name.encode()
    at = hl + len(exts)
    d[at:at + len(nb)] = nb
    put('Q', d, 8, at); put('I', d, 16, len(nb))
    save(fname, d, outcome, text)
with_backing('loop-self.qcow2', 'loop-self.qcow2', text='loops')
with_backing('loop-self-dotted.qcow2', './../hostile/loop-self-dotted.qcow2', text='loops')
with_backing('loop-a.qcow2', 'loop-b.qcow2', text='loops')
with_backing('loop-b.qcow2', 'loop-a.qcow2', text='loops')
with_backing('loop-three-a.qcow2', 'loop-three-b.qcow2', text='loops')
with_backing('loop-three-b.qcow2', 'loop-three-c.qcow2', text='loops')
with_backing('loop-three-c.qcow2', 'loop-three-a.qcow2', text='loops')
for fname, name in (('proto-json.qcow2', 'json:{"file":{"driver":"nbd","host":"127.0.0.1","port":"10809"}}'),
                    ('proto-nbd.qcow2', 'nbd://127.0.0.1:10809/export'),
                    ('proto-nbd-unix.qcow2', 'nbd+unix:///export?socket=/run/evil.sock'),
                    ('proto-http.qcow2', 'http://example.invalid/disk.qcow2'),
                    ('proto-https.qcow2', 'https://example.invalid/disk.qcow2'),
                    ('proto-file.qcow2', 'file:/etc/hostname'),
                    ('proto-ssh.qcow2', 'ssh://root@example.invalid/disk'),
                    ('proto-iscsi.qcow2', 'iscsi://example.invalid/iqn.x/0')):
    with_backing(fname, name, fmt=b'raw', text='protocol')
with_backing('backing-no-format.qcow2', 'clean-v3-512.qcow2', fmt=b'', text='never guesses')
with_backing('backing-format-vmdk.qcow2', 'clean-v3-512.qcow2', fmt=b'vmdk', text='unsupported backing format')
with_backing('backing-missing.qcow2', 'does-not-exist.qcow2', text='does-not-exist')
with_backing('backing-escape.qcow2', '../../../../../../../../etc/hostname', fmt=b'raw', outcome='any')
with_backing('backing-absolute.qcow2', '/etc/hostname', fmt=b'raw', outcome='any')
with_backing('backing-dev-zero.qcow2', '/dev/zero', fmt=b'qcow2', outcome='any')
with_backing('backing-is-raw-with-qcow2-header.qcow2', 'guest-disk.raw', fmt=b'raw', outcome='opens')
with_backing('backing-raw-no-format.qcow2', 'guest-disk.raw', fmt=b'', text='never guesses')
with_backing('backing-empty-name.qcow2', '', outcome='opens')
with_backing('backing-nul.qcow2', 'a\0b', text='NUL')
# The "raw" disk a guest wrote a qcow2 header into (backing /etc/hostname).
g = load('guest-header.qcow2')
save('guest-disk.raw', g, 'any')
# Backing name offset/size that lie.
for tag, off, size in (('offset-past-file', 1 << 40, 8), ('size-1024', hl, 1024),
                       ('offset-overflow', (1 << 64) - 4, 8), ('past-cluster', CS - 4, 16)):
    d = bytearray(base); put('Q', d, 8, off); put('I', d, 16, size)
    save(f'backing-name-{tag}.qcow2', d, 'open-error', '')

with open(os.path.join(out, 'EXPECT'), 'w') as f:
    for name, outcome, text in expect:
        f.write(f'{name}\t{outcome}\t{text}\n')
print(f'{len(expect)} images in {out}')
PY
