//! `dllm synth`: random-weight checkpoints with the exact layout of real ones.
