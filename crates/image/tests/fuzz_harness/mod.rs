//! The bodies of the fuzz targets, shared by `fuzz/fuzz_targets/*.rs` (which
//! include this file with `#[path]`) and by `tests/fuzz_regressions.rs`,
//! which replays every committed corpus file and saved crash input through
//! exactly the same code.
//!
//! Inputs are decoded with the small [`Reader`] below rather than the
//! `arbitrary` crate: `arbitrary` would have to become a dev-dependency of
//! strata-image for `cargo test` to decode corpus files identically, and a
//! forty-line reader keeps the two decoders from ever drifting apart.
//!
//! Every target bounds its work: guest bytes read, extents mapped, write
//! operations and their lengths. Errors are fine; panics are the findings,
//! and so are broken invariants (a zero-length extent would make reads loop
//! forever; an error that does not name the file is useless to a user).
#![allow(dead_code)] // each includer uses a subset

use std::path::Path;

use strata_format::{refcount, CompressedDescriptor, Geometry, Header, L2Entry};
use strata_image::{Chain, Image, Layer, MemStorage, Qcow2Image, RawImage};

/// Guest bytes read through the chain per iteration (from the start, plus
/// a window at the end of the disk).
pub const READ_CAP: u64 = 2 << 20;
/// Largest piece read at once.
pub const MAX_PIECE: u64 = 256 << 10;
/// Most extents `resolve` walks per iteration.
pub const MAX_EXTENTS: usize = 4096;
/// Most write operations per iteration.
pub const MAX_OPS: usize = 24;
/// Longest write/zero/discard, in bytes.
pub const MAX_OP_LEN: u64 = 192 << 10;

/// Path the top image is known by in errors.
pub const TOP: &str = "fuzz-top.qcow2";
/// Path the backing image is known by in errors.
pub const BASE: &str = "fuzz-base.img";

/// A byte reader that never fails: past the end it yields zeros.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data }
    }
    /// Takes up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }
    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    fn le<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }
    /// A byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        self.le::<1>()[0]
    }
    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.le())
    }
    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.le())
    }
    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.le())
    }
}

/// splitmix64: piece sizes from a seed, so inputs stay short.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A value in `1..=max`.
    pub fn piece(&mut self, max: u64) -> u64 {
        1 + self.next() % max.max(1)
    }
}

/// Panics unless the error's message names `path`: every engine error
/// about a file must say which file.
pub fn assert_names(err: &strata_image::Error, path: &str) {
    let msg = err.to_string();
    assert!(
        msg.contains(path),
        "error does not name the file {path}: {msg} ({err:?})"
    );
}

// ---------------------------------------------------------------- header

/// `header`: Header::parse on arbitrary bytes; when it succeeds, encode and
/// parse again and expect the same header. (Finding F1, feature names that
/// changed on rewrite when not UTF-8, is fixed: names keep their raw bytes.)
pub fn header(data: &[u8]) {
    header_check(data)
}

/// The same as [`header`] (kept for the regression tests that name it).
pub fn header_strict(data: &[u8]) {
    header_check(data)
}

fn header_check(data: &[u8]) {
    let Ok(h) = Header::parse(data) else { return };
    // Derived values must not panic either.
    let _ = (h.geometry(), h.cluster_size(), h.refcount_bits());
    let _ = (h.backing_format(), h.bitmaps(), h.feature_names().count());
    let _ = h.layout();
    let Ok(encoded) = h.encode() else { return };
    let again = Header::parse(&encoded)
        .unwrap_or_else(|e| panic!("an encoded header does not parse again: {e}\nheader: {h:?}"));
    // encode places the backing name after the extensions: only its
    // offset and length may change.
    let mut want = h.clone();
    let Ok((off, len)) = h.layout() else { return };
    want.set_backing_file_location(off, len);

    assert_eq!(again, want, "encode -> parse changed the header");
}

// ------------------------------------------------------------ l2_refcount

/// `l2_refcount`: L2 entry states, compressed descriptors and refcount
/// blocks of every width on arbitrary input.
pub fn l2_refcount(data: &[u8]) {
    let mut r = Reader::new(data);
    let cluster_bits = 9 + u32::from(r.u8()) % 13;
    let extended = r.u8() & 1 != 0;
    let Ok(geo) = Geometry::new(cluster_bits, extended) else {
        return;
    };
    let word = r.u64();
    let bitmap = r.u64();
    let sc = u32::from(r.u8());
    let entry = L2Entry { word, bitmap };
    let _ = entry.state(geo, sc);
    let _ = entry.host_cluster();
    if let Some(d) = entry.compressed_descriptor(geo) {
        let (first, last) = d.host_clusters(geo);
        assert!(first <= last, "compressed descriptor ends before it starts");
        assert!(
            d.len <= (1u64 << (cluster_bits - 8)) * 512,
            "compressed descriptor longer than its sector count allows"
        );
        // A descriptor that can be encoded decodes to itself.
        if let Some(w) = CompressedDescriptor::encode(d.offset, d.len, cluster_bits) {
            let back = CompressedDescriptor::decode(w & !(3u64 << 62), cluster_bits);
            assert_eq!(back.offset, d.offset);
            assert!(back.len >= d.len);
        }
    }
    let off = r.u64();
    let len = r.u64();
    if let Some(w) =
        CompressedDescriptor::encode(strata_format::HostOffset::new(off), len, cluster_bits)
    {
        let back = CompressedDescriptor::decode(w & !(3u64 << 62), cluster_bits);
        assert_eq!(
            back.offset.get(),
            off,
            "descriptor offset does not round-trip"
        );
        assert!(back.len >= len, "descriptor shorter than what was encoded");
    }
    // An L2 table built from the rest: read every entry, write it back.
    let table_len = (r.u16() as usize).min(4096);
    let mut table = r.bytes(table_len).to_vec();
    let n = table.len() as u64 / geo.l2_entry_size() + 2;
    for i in 0..n {
        if let Ok(e) = L2Entry::read(&table, geo, i) {
            let _ = e.state(geo, sc % 33);
            assert!(
                e.write(&mut table, geo, i).is_ok(),
                "entry {i} read but not written"
            );
        }
    }
    // Refcount blocks: get/set at every index, of every width.
    let order = u32::from(r.u8()) % 8;
    let mut block = r.bytes(512).to_vec();
    let value = r.u64();
    let _ = refcount::max_refcount(order.min(6));
    let _ = refcount::entries_per_block(cluster_bits, order.min(6));
    let entries = ((block.len() as u64 * 8) >> order.min(6)) + 2;
    for i in 0..entries {
        let before = refcount::get(&block, order, i);
        if refcount::set(&mut block, order, i, value) {
            assert_eq!(
                refcount::get(&block, order, i),
                Some(value),
                "order {order} index {i}"
            );
        } else if order <= 6 && value <= refcount::max_refcount(order) {
            assert!(before.is_none(), "set refused an index get accepted");
        }
    }
    // Snapshot entries.
    let snap = r.rest();
    if let Ok(n) = strata_format::snapshot::entry_len(snap, 0) {
        if let Some(bytes) = snap.get(..n) {
            let _ = strata_format::snapshot::Snapshot::parse(bytes, 0);
        }
    }
    let _ = strata_format::snapshot::Snapshot::parse(snap, 0);
}

// --------------------------------------------------------------- open_read

/// The decoded input of `open_read` and `write`: a top image, maybe a
/// backing layer, a seed and the remaining bytes (operations).
pub struct ChainInput<'a> {
    /// Bit 0: a backing layer; bit 1: it is raw (else qcow2).
    pub flags: u8,
    /// Seed of piece sizes.
    pub seed: u32,
    /// The top image's bytes.
    pub top: &'a [u8],
    /// The backing image's bytes (empty when none).
    pub base: &'a [u8],
    /// What follows (write operations).
    pub rest: &'a [u8],
}

/// Layout: flags u8, seed u32, top_len u32, base_len u32, top, base, rest
/// (all little-endian; lengths clamp to what is there).
pub fn decode_chain_input(data: &[u8]) -> ChainInput<'_> {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let seed = r.u32();
    let top_len = r.u32() as usize;
    let base_len = r.u32() as usize;
    let top = r.bytes(top_len);
    let base = r.bytes(base_len);
    let rest = r.rest();
    ChainInput {
        flags,
        seed,
        top,
        base,
        rest,
    }
}

/// The inverse of [`decode_chain_input`], for making seeds.
pub fn encode_chain_input(flags: u8, seed: u32, top: &[u8], base: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut v = vec![flags];
    v.extend_from_slice(&seed.to_le_bytes());
    v.extend_from_slice(&(top.len() as u32).to_le_bytes());
    v.extend_from_slice(&(base.len() as u32).to_le_bytes());
    v.extend_from_slice(top);
    v.extend_from_slice(base);
    v.extend_from_slice(rest);
    v
}

/// Opens the backing layer of `input`, if it has one.
fn open_base(input: &ChainInput<'_>) -> Option<Layer> {
    if input.flags & 1 == 0 {
        return None;
    }
    let storage = Box::new(MemStorage::from_bytes(input.base.to_vec()));
    let image = if input.flags & 2 != 0 {
        Image::Raw(RawImage::open(storage, Path::new(BASE)).ok()?)
    } else {
        match Qcow2Image::open(storage, Path::new(BASE)) {
            Ok(q) => Image::Qcow2(q),
            Err(e) => {
                assert_names(&e, BASE);
                return None;
            }
        }
    };
    Some(Layer::new(BASE.into(), Some(BASE.into()), image))
}

/// Builds the chain of `input` with `top` as its top image.
fn chain_of(input: &ChainInput<'_>, top: Qcow2Image) -> Chain {
    let mut layers = vec![Layer::new(TOP.into(), None, Image::Qcow2(top))];
    layers.extend(open_base(input));
    match Chain::from_layers(layers) {
        Ok(c) => c,
        Err(e) => panic!("a two-layer chain was refused: {e}"),
    }
}

/// Reads `[start, end)` of the guest view in random-sized pieces into
/// `out` (which covers `[start, end)`); returns whether every piece read.
fn read_pieces(chain: &Chain, rng: &mut Rng, start: u64, end: u64, out: &mut [u8]) -> bool {
    let mut pos = start;
    let mut all_ok = true;
    while pos < end {
        let n = rng.piece(MAX_PIECE).min(end - pos);
        let at = (pos - start) as usize;
        let Some(buf) = out.get_mut(at..at + n as usize) else {
            panic!("piece outside the buffer");
        };
        if let Err(e) = chain.read_at(buf, pos) {
            assert_names_any(&e);
            all_ok = false;
        }
        pos += n;
    }
    all_ok
}

/// Engine errors must name one of the two files.
fn assert_names_any(e: &strata_image::Error) {
    let msg = e.to_string();
    assert!(
        msg.contains(TOP) || msg.contains(BASE),
        "error names neither file: {msg} ({e:?})"
    );
}

/// Reads the guest view (the first READ_CAP bytes and a window at the
/// end) in random pieces and in one go, and expects the same bytes.
pub fn read_view(chain: &Chain, seed: u64) {
    let size = chain.virtual_size();
    let mut rng = Rng::new(seed);
    let head = size.min(READ_CAP);
    let tail_start = size.saturating_sub(64 << 10).max(head);
    for (start, end) in [(0, head), (tail_start, size)] {
        if start >= end {
            continue;
        }
        let len = (end - start) as usize;
        let mut pieces = vec![0u8; len];
        let pieces_ok = read_pieces(chain, &mut rng, start, end, &mut pieces);
        let mut whole = vec![0u8; len];
        let whole_ok = match chain.read_at(&mut whole, start) {
            Ok(()) => true,
            Err(e) => {
                assert_names_any(&e);
                false
            }
        };
        if pieces_ok && whole_ok && pieces != whole {
            let at = pieces.iter().zip(&whole).position(|(a, b)| a != b);
            panic!(
                "reading in pieces and in one go differ at guest byte {:?}",
                at.map(|i| start + i as u64)
            );
        }
    }
}

/// Maps the whole guest view with `resolve` (at most MAX_EXTENTS extents)
/// and checks that the extents tile it.
pub fn map_view(chain: &Chain) {
    let size = chain.virtual_size();
    let layers = chain.layers().len();
    let mut pos = 0u64;
    for _ in 0..MAX_EXTENTS {
        if pos >= size {
            break;
        }
        let want = size - pos;
        match chain.block_status(pos, want).next().expect("an extent") {
            Ok(s) => {
                assert_eq!(s.start, pos, "extent does not start where asked");
                assert!(
                    s.length > 0,
                    "zero-length extent at {pos:#x}: reads would loop"
                );
                assert!(s.length <= want, "extent longer than asked at {pos:#x}");
                assert!(s.depth < layers, "depth {} of {layers} layers", s.depth);
                assert!(
                    s.layer.is_none_or(|l| l < layers),
                    "layer of {layers}: {s:?}"
                );
                pos += s.length;
            }
            Err(e) => {
                assert_names_any(&e);
                // Skip the cluster and carry on.
                pos = pos.saturating_add(512 << 10) & !((512 << 10) - 1);
            }
        }
    }
}

/// `open_read`: open the top image (and a backing layer), read and map
/// the guest view, and check the top.
pub fn open_read(data: &[u8]) {
    let input = decode_chain_input(data);
    let storage = Box::new(MemStorage::from_bytes(input.top.to_vec()));
    let top = match Qcow2Image::open(storage, Path::new(TOP)) {
        Ok(q) => q,
        Err(e) => {
            assert_names(&e, TOP);
            return;
        }
    };
    let _ = (
        top.l1().len(),
        top.snapshots().len(),
        top.header().backing_format(),
    );
    let chain = chain_of(&input, top);
    read_view(&chain, u64::from(input.seed));
    map_view(&chain);
    // check: never panics; a failure names the file.
    if let Some(q) = chain.top().image.as_qcow2() {
        match strata_image::check::check(q) {
            Ok(report) => {
                let _ = report.exit_code();
            }
            Err(e) => assert_names(&e, TOP),
        }
    }
}

// ------------------------------------------------------------------ write

/// One operation of the `write` target.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Write `len` bytes of `fill` at `offset`.
    Write { offset: u64, len: u64, fill: u8 },
    /// Make a range read as zeros.
    Zero { offset: u64, len: u64, unmap: bool },
    /// Discard a range.
    Discard { offset: u64, len: u64 },
    /// Flush.
    Flush,
}

/// Decodes up to MAX_OPS operations on a disk of `size` bytes: offsets
/// mostly inside the disk (sometimes at its end or past it).
pub fn decode_ops(bytes: &[u8], size: u64) -> Vec<Op> {
    let mut r = Reader::new(bytes);
    let mut ops = Vec::new();
    while !r.is_empty() && ops.len() < MAX_OPS {
        let kind = r.u8();
        let raw_off = r.u32() as u64 * 512 + u64::from(r.u16() % 512);
        let offset = match kind >> 4 {
            // Past the end, or straddling it.
            0 => size.saturating_sub(raw_off % (MAX_OP_LEN + 1)) + (raw_off & 1) * MAX_OP_LEN,
            _ => raw_off % size.clamp(1, READ_CAP * 4),
        };
        let len = u64::from(r.u16()) * 4 % (MAX_OP_LEN + 1);
        let fill = r.u8();
        ops.push(match kind % 4 {
            0 => Op::Write { offset, len, fill },
            1 => Op::Zero {
                offset,
                len,
                unmap: fill & 1 != 0,
            },
            2 => Op::Discard { offset, len },
            _ => Op::Flush,
        });
    }
    ops
}

/// `write`: open the top image for writing on memory storage, apply the
/// operations, then reopen the result read-only and read it.
pub fn write(data: &[u8]) {
    let input = decode_chain_input(data);
    let mem = MemStorage::from_bytes(input.top.to_vec());
    let top = match Qcow2Image::open_rw(Box::new(mem.clone()), Path::new(TOP)) {
        Ok(q) => q,
        Err(e) => {
            assert_names(&e, TOP);
            return;
        }
    };
    let mut chain = chain_of(&input, top);
    let size = chain.virtual_size();
    for op in decode_ops(input.rest, size) {
        let r = match op {
            Op::Write { offset, len, fill } => chain.write_at(&vec![fill; len as usize], offset),
            Op::Zero { offset, len, unmap } => chain.write_zeroes(offset, len, unmap),
            Op::Discard { offset, len } => chain.discard(offset, len),
            Op::Flush => chain.flush(),
        };
        if let Err(e) = r {
            if !matches!(e, strata_image::Error::InvalidArgument(_)) {
                assert_names_any(&e);
            }
        }
    }
    let _ = chain.flush();
    drop(chain);
    // Whatever was written must open (or be refused) and read without a panic.
    let after = mem.to_bytes();
    if let Ok(q) = Qcow2Image::open(Box::new(MemStorage::from_bytes(after)), Path::new(TOP)) {
        let chain = chain_of(&input, q);
        read_view(&chain, u64::from(input.seed));
        map_view(&chain);
    }
}
