//! Any bytes must parse to valid readings or counted rejections, never a
//! panic or a hang. Run with `cargo +nightly fuzz run parse_datagram`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensord::reading::{Rejection, parse_datagram};

fuzz_target!(|data: &[u8]| {
    let (mut out, mut rejections) = (Vec::new(), Vec::<Rejection>::new());
    parse_datagram(data, 1_764_150_000.0, &mut out, &mut rejections);
    for reading in &out {
        assert!(reading.check().is_ok(), "{reading:?} from {data:?}");
    }
});
