"""The micro-benchmarks; ``asyncdmabuf bench`` imports and runs them side by side."""
