"""Speech tokens -> waveform: the CosyVoice 3 token2wav (flow-matching mel model, then HiFT)."""
