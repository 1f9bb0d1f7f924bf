"""Pure decoding math: sampling chain, acceptance, choice of k, UTF-8-safe text, output
bookkeeping. No I/O and no HTTP here; nothing above this package is imported."""
