//! Decompression (and compression) of qcow2 compressed clusters.

use std::io::Read;

use strata_format::CompressionType;

/// Decompresses one cluster: `input` holds the compressed bytes (possibly
/// followed by padding), `out` must be filled completely, as QEMU insists.
/// Returns a static description of what went wrong.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
    match kind {
        CompressionType::Deflate => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == out.len() => Ok(()),
                Ok(_) => Err("compressed cluster decompresses to less than a cluster"),
                Err(_) => Err("compressed cluster is not valid deflate data"),
            }
        }
        CompressionType::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|_| "cannot start zstd decompression")?;
            dec.read_exact(out)
                .map_err(|_| "compressed cluster is not valid zstd data or too short")
        }
    }
}

/// Compresses one cluster; `None` when the result is not smaller than the
/// input (the cluster is then stored uncompressed, as QEMU does).
pub fn compress(kind: CompressionType, input: &[u8]) -> Option<Vec<u8>> {
    let out = match kind {
        CompressionType::Deflate => {
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(input.len());
            match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => out,
                _ => return None,
            }
        }
        CompressionType::Zstd => zstd::bulk::compress(input, 0).ok()?,
    };
    (out.len() < input.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_algorithms_round_trip_a_cluster() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let mut c = compress(kind, &data).unwrap();
            c.extend_from_slice(&[0xaa; 300]); // sector padding after the stream
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Deflate, &[0xff; 100], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 100], &mut out).is_err());
    }
}
