//! QEMU-compatible image locking (placeholder).
