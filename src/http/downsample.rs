//! Reduces one sensor's readings over a window to at most `points`
//! buckets of equal length, with the min, max and mean of every numeric
//! measurement per bucket: temperature, humidity and the numeric fields of
//! `extra`. A week at 100 readings a second draws as fast as an hour.

use std::collections::HashMap;

use serde::Serialize;

use crate::store::RawReading;

/// What `GET /api/sensors/{id}/readings` answers, less the sensor's id.
#[derive(Debug, PartialEq, Serialize)]
pub struct Downsampled {
    pub from: f64,
    pub to: f64,
    /// The most buckets asked for.
    pub points: usize,
    pub bucket_seconds: f64,
    /// Readings in the window.
    pub readings: u64,
    /// Per non-empty bucket, in time order: the mean `ingested_at` of its
    /// readings, and how many there are.
    pub t: Vec<f64>,
    pub count: Vec<u64>,
    /// Temperature and humidity first, then the extra fields by name; only
    /// measurements with a value in the window.
    pub series: Vec<Series>,
}

/// One measurement per bucket; null where a bucket has no value for it.
#[derive(Debug, PartialEq, Serialize)]
pub struct Series {
    pub name: String,
    /// By the README's convention; none for extra fields.
    pub unit: Option<&'static str>,
    pub min: Vec<Option<f64>>,
    pub avg: Vec<Option<f64>>,
    pub max: Vec<Option<f64>>,
}

/// One measurement's aggregate in one bucket.
#[derive(Clone, Copy, Debug)]
struct Aggregate {
    n: u64,
    min: f64,
    max: f64,
    sum: f64,
}

impl Default for Aggregate {
    fn default() -> Self {
        Aggregate {
            n: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
        }
    }
}

impl Aggregate {
    fn add(&mut self, value: f64) {
        self.n += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.sum += value;
    }
}

/// One bucket being filled.
#[derive(Debug, Default)]
struct Bucket {
    readings: u64,
    time_sum: f64,
    /// Indexed like `Downsampler::names`.
    measures: Vec<Aggregate>,
}

impl Bucket {
    fn add(&mut self, measure: usize, value: f64) {
        if self.measures.len() <= measure {
            self.measures.resize(measure + 1, Aggregate::default());
        }
        self.measures[measure].add(value);
    }
}

/// Collects readings in time order into buckets.
pub struct Downsampler {
    from: f64,
    to: f64,
    width: f64,
    buckets: Vec<Bucket>,
    /// Measurement names; 0 and 1 are temperature and humidity.
    names: Vec<String>,
    index: HashMap<String, usize>,
    readings: u64,
}

impl Downsampler {
    /// Buckets for `from..=to` (from <= to), at most `points` (at least 1).
    pub fn new(from: f64, to: f64, points: usize) -> Self {
        let points = points.max(1);
        Downsampler {
            from,
            to,
            width: (to - from) / points as f64,
            buckets: (0..points).map(|_| Bucket::default()).collect(),
            names: vec!["temperature".into(), "humidity".into()],
            index: HashMap::new(),
            readings: 0,
        }
    }

    /// Adds one reading of the window. The store chose it: one just
    /// outside by the store's rounding of times (PostgreSQL keeps
    /// microseconds) goes in the nearest bucket.
    pub fn add(&mut self, reading: RawReading<'_>) {
        let last = self.buckets.len() - 1;
        let i = if self.width > 0.0 {
            // A negative offset saturates to bucket 0.
            (((reading.at - self.from) / self.width) as usize).min(last)
        } else {
            0
        };
        self.readings += 1;
        let bucket = &mut self.buckets[i];
        bucket.readings += 1;
        bucket.time_sum += reading.at;
        for (measure, value) in [(0, reading.temperature), (1, reading.humidity)] {
            if let Some(value) = value.filter(|v| v.is_finite()) {
                bucket.add(measure, value);
            }
        }
        let Some(extra) = reading.extra else { return };
        // Another program may have written anything: what is not a JSON
        // object of numbers adds nothing.
        let Ok(fields) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(extra)
        else {
            return;
        };
        for (name, value) in fields {
            let Some(value) = value.as_f64().filter(|v| v.is_finite()) else {
                continue;
            };
            let measure = match self.index.get(&name) {
                Some(&measure) => measure,
                None => {
                    self.names.push(name.clone());
                    self.index.insert(name, self.names.len() - 1);
                    self.names.len() - 1
                }
            };
            self.buckets[i].add(measure, value);
        }
    }

    /// The non-empty buckets, and every measurement that has a value.
    pub fn finish(self) -> Downsampled {
        let filled: Vec<&Bucket> = self.buckets.iter().filter(|b| b.readings > 0).collect();
        let mut order: Vec<usize> = (0..self.names.len()).collect();
        // Temperature and humidity first, then by name.
        order[2..].sort_by(|a, b| self.names[*a].cmp(&self.names[*b]));
        let series = order
            .into_iter()
            .filter(|m| {
                filled
                    .iter()
                    .any(|b| b.measures.get(*m).is_some_and(|a| a.n > 0))
            })
            .map(|m| {
                let of = |f: fn(&Aggregate) -> f64| -> Vec<Option<f64>> {
                    filled
                        .iter()
                        .map(|b| b.measures.get(m).filter(|a| a.n > 0).map(f))
                        .collect()
                };
                Series {
                    name: self.names[m].clone(),
                    unit: match m {
                        0 => Some("°C"),
                        1 => Some("%RH"),
                        _ => None,
                    },
                    min: of(|a| a.min),
                    avg: of(|a| a.sum / a.n as f64),
                    max: of(|a| a.max),
                }
            })
            .collect();
        Downsampled {
            from: self.from,
            to: self.to,
            points: self.buckets.len(),
            bucket_seconds: self.width,
            readings: self.readings,
            t: filled
                .iter()
                .map(|b| b.time_sum / b.readings as f64)
                .collect(),
            count: filled.iter().map(|b| b.readings).collect(),
            series,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(at: f64, temperature: Option<f64>, extra: Option<&str>) -> RawReading<'_> {
        RawReading {
            at,
            temperature,
            humidity: None,
            extra,
        }
    }

    /// Ten thousand readings into ten buckets: each bucket's min, max and
    /// mean are those of its thousand readings.
    #[test]
    fn buckets_hold_min_max_and_mean() {
        let mut d = Downsampler::new(0.0, 10_000.0, 10);
        for i in 0..10_000 {
            d.add(reading(i as f64, Some(i as f64), None));
        }
        let out = d.finish();
        assert_eq!(out.t.len(), 10);
        assert_eq!(out.count, vec![1000; 10]);
        assert_eq!(out.series.len(), 1);
        let t = &out.series[0];
        assert_eq!(t.name, "temperature");
        assert_eq!(t.min[3], Some(3000.0));
        assert_eq!(t.max[3], Some(3999.0));
        assert_eq!(t.avg[3], Some(3499.5));
        assert_eq!(out.t[3], 3499.5);
    }

    /// Numeric extra fields become series after temperature and humidity,
    /// by name; other values and broken JSON are ignored; the window's
    /// last instant falls in the last bucket, and a reading a rounding
    /// outside the window in the nearest.
    #[test]
    fn extra_fields_are_series() {
        let mut d = Downsampler::new(0.0, 2.0, 2);
        d.add(reading(
            0.0,
            None,
            Some(r#"{"rssi": -60, "pressure": 1000.5, "ok": true}"#),
        ));
        d.add(reading(1.0, Some(20.0), Some("not json")));
        d.add(reading(2.0, None, Some(r#"{"rssi": -70, "label": "x"}"#)));
        d.add(reading(-1e-7, Some(10.0), None));
        let out = d.finish();
        let names: Vec<&str> = out.series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["temperature", "pressure", "rssi"]);
        assert_eq!(out.readings, 4);
        assert_eq!(out.series[0].avg, vec![Some(10.0), Some(20.0)]);
        assert_eq!(out.series[1].max, vec![Some(1000.5), None]);
        assert_eq!(out.series[2].min, vec![Some(-60.0), Some(-70.0)]);
    }
}
