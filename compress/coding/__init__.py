"""Entropy coding: canonical Huffman codes, symbol and index streams, fixed-width bit packing."""
