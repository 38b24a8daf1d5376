"""Delta tables through delta-rs, and the bridge that lets Spark read and write them."""
