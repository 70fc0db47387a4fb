"""Policy: YAML bundles loaded with line marks, validated, and compiled into an immutable Policy."""
