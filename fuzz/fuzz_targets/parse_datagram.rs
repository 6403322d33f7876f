//! Any bytes must parse to valid readings or counted rejections, never a
//! panic or a hang, under every `--timestamp-unit` and `--extra-fields`
//! (the first byte picks them). Valid readings must survive the spill
//! form. Run with `cargo +nightly fuzz run parse_datagram`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensord::Reading;
use sensord::reading::{ExtraFields, Format, Rejection, TimestampUnit, parse_datagram};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, data)) = data.split_first() else {
        return;
    };
    let format = Format {
        timestamp_unit: [
            TimestampUnit::S,
            TimestampUnit::Ms,
            TimestampUnit::Us,
            TimestampUnit::Ns,
        ][usize::from(pick & 3)],
        extra_fields: if pick & 4 == 0 {
            ExtraFields::Keep
        } else {
            ExtraFields::Drop
        },
    };
    let (mut out, mut rejections) = (Vec::new(), Vec::<Rejection>::new());
    parse_datagram(data, 1_764_150_000.0, &format, &mut out, &mut rejections);
    for reading in &out {
        assert!(reading.check().is_ok(), "{reading:?} from {data:?}");
        let line = serde_json::to_string(reading).expect("a reading serializes");
        let back: Reading = serde_json::from_str(&line).expect("a spill line parses");
        assert_eq!(&back, reading, "{line}");
    }
});
