//! LLaDA: the model of "Large Language Diffusion Models" (Nie et al., 2025).
