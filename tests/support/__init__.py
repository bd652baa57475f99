"""What the tests share that is not a fixture: models built from known weights, numerical
references, the error-caret check, the hostile-file builder and the loader fuzzer."""
