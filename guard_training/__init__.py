"""GenGuard's training pipeline (sample -> label -> features -> train -> ship), apart from the
guard's runtime in guard/ (probe, stop policy, vLLM adapter), which neither imports this."""
