# Everyday tasks. `make test` is the README's test command; .ci/run runs the same.
.PHONY: run test fmt lint bench doc

run:
	cargo run --release -- serve

test:
	cargo test --locked

fmt:
	cargo fmt

lint:
	cargo clippy --locked --all-targets -- -D warnings

bench:
	cargo bench --bench index

doc:
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps
