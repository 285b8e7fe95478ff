"""What `lvr eval` and `lvr compare` need besides decoding: reading eval sets (`items`), scoring a
reply two ways (`scoring`), intervals and paired tests (`stats`), the answer-letter prior and the
blind baseline (`baselines`), provenance (`provenance`) and the report (`report`)."""
