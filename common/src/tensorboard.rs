//! TensorBoard event files, written without TensorFlow: a file is a sequence of TFRecords,
//! each `u64 length (LE)`, `u32 masked CRC-32C of the length`, the bytes of one
//! `tensorflow.Event` protobuf, `u32 masked CRC-32C of the bytes`. The first event names the
//! file version (`brain.Event:2`); each further event holds scalar summaries of one step
//! (`Summary.Value.simple_value`), which TensorBoard, W&B's and MLflow's importers read.
//! Files are named `events.out.tfevents.<unix seconds>.<host>.<pid>.<n>`, the name TensorBoard
//! looks for in a folder (it reads every file there in name order).

use prost::Message;

/// The file-version event every event file starts with.
pub const FILE_VERSION: &str = "brain.Event:2";

/// `tensorflow.Event`, with only the fields written here (`what` is a oneof in the .proto; one
/// field of it is set per event, which is the same bytes on the wire).
#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with `simple_value` (a oneof member, so 0.0 is still written).
#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// One step's scalars, tagged like `train/loss`.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalars {
    pub step: u64,
    /// Seconds since the Unix epoch when they were recorded.
    pub wall_time: f64,
    pub values: Vec<(String, f64)>,
}

/// The name of an event file started at `unix_secs` by this process; `n` numbers the files
/// one writer starts, so their names sort in writing order.
pub fn file_name(unix_secs: u64, host: &str, n: u32) -> String {
    format!(
        "events.out.tfevents.{unix_secs:010}.{host}.{}.{n:04}",
        std::process::id()
    )
}

/// The first record of every event file.
pub fn header(wall_time: f64) -> Vec<u8> {
    record(
        &Event {
            wall_time,
            step: 0,
            file_version: Some(FILE_VERSION.into()),
            summary: None,
        }
        .encode_to_vec(),
    )
}

/// The record of one step's scalars. Non-finite values are left out (TensorBoard would plot
/// them as gaps anyway, and a NaN would hide the rest of the curve's scale).
pub fn scalars(s: &Scalars) -> Vec<u8> {
    let value = s
        .values
        .iter()
        .filter(|(_, v)| v.is_finite())
        .map(|(tag, v)| SummaryValue {
            tag: tag.clone(),
            simple_value: Some(*v as f32),
        })
        .collect();
    record(
        &Event {
            wall_time: s.wall_time,
            step: s.step as i64,
            file_version: None,
            summary: Some(Summary { value }),
        }
        .encode_to_vec(),
    )
}

/// The scalars of an event file's records (for tests and `contrail`'s own readers); an error
/// names the first record whose framing or checksum is wrong.
pub fn read(mut bytes: &[u8]) -> Result<Vec<Scalars>, String> {
    let mut out = Vec::new();
    let mut index = 0;
    while !bytes.is_empty() {
        let bad = |what: &str| format!("record {index}: {what}");
        if bytes.len() < 12 {
            return Err(bad("truncated header"));
        }
        let len_bytes = &bytes[..8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        if u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) != masked_crc(len_bytes) {
            return Err(bad("length checksum"));
        }
        if bytes.len() < 12 + len + 4 {
            return Err(bad("truncated data"));
        }
        let data = &bytes[12..12 + len];
        let crc = u32::from_le_bytes(bytes[12 + len..16 + len].try_into().expect("4 bytes"));
        if crc != masked_crc(data) {
            return Err(bad("data checksum"));
        }
        let event = Event::decode(data).map_err(|e| bad(&e.to_string()))?;
        if let Some(summary) = event.summary {
            out.push(Scalars {
                step: event.step as u64,
                wall_time: event.wall_time,
                values: summary
                    .value
                    .into_iter()
                    .filter_map(|v| Some((v.tag, f64::from(v.simple_value?))))
                    .collect(),
            });
        }
        bytes = &bytes[16 + len..];
        index += 1;
    }
    Ok(out)
}

fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// CRC-32C (Castagnoli), byte-wise from a table built at compile time.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82F6_3B78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masking, so a CRC over data holding CRCs stays strong.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC catalogue's check value of CRC-32C over the ASCII digits 1-9.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn records_read_back_and_corruption_is_named() {
        let step = Scalars {
            step: 42,
            wall_time: 1.7e9,
            values: vec![
                ("train/loss".into(), 2.5),
                ("train/lr".into(), 0.0),
                ("train/nan".into(), f64::NAN),
            ],
        };
        let mut file = header(1.7e9);
        file.extend(scalars(&step));
        let back = read(&file).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].step, 42);
        assert_eq!(
            back[0].values,
            vec![("train/loss".into(), 2.5), ("train/lr".into(), 0.0)]
        );
        let last = file.len() - 6;
        file[last] ^= 1;
        assert_eq!(read(&file).unwrap_err(), "record 1: data checksum");
    }
}
