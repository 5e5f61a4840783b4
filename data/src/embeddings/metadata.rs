//! The metadata beside each embedding part: one row per embedding, in a Parquet file with the
//! columns `key` (string), `caption` (string, may be null) and `label` (int64, may be null),
//! which pandas, pyarrow and clip-retrieval read directly. Reading is lenient about the other
//! columns a clip-retrieval file may carry, and takes `label` as any integer type.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Int16Type, Int32Type, Int64Type, Int8Type};
use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;

/// One embedding's metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Record {
    /// The sample's key (its `__key__` in the WebDataset shard).
    pub key: String,
    pub caption: Option<String>,
    pub label: Option<i64>,
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("caption", DataType::Utf8, true),
        Field::new("label", DataType::Int64, true),
    ]))
}

/// The Parquet bytes of `records`.
pub fn encode(records: &[Record]) -> Result<Vec<u8>> {
    let keys = StringArray::from_iter_values(records.iter().map(|r| r.key.as_str()));
    let captions: StringArray = records.iter().map(|r| r.caption.as_deref()).collect();
    let labels: Int64Array = records.iter().map(|r| r.label).collect();
    let columns: Vec<ArrayRef> = vec![Arc::new(keys), Arc::new(captions), Arc::new(labels)];
    let batch = RecordBatch::try_new(schema(), columns).context("building the metadata table")?;
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, schema(), None)?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(out)
}

/// The records of a metadata Parquet file; `name` goes into every error.
pub fn decode(bytes: Bytes, name: &str) -> Result<Vec<Record>> {
    decode_inner(bytes).with_context(|| format!("reading {name} as embedding metadata"))
}

fn decode_inner(bytes: Bytes) -> Result<Vec<Record>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .context("not a Parquet file")?
        .build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch?;
        let keys = batch.column_by_name("key");
        let captions = batch.column_by_name("caption");
        let labels = match batch.column_by_name("label") {
            Some(col) => Some(labels_of(col)?),
            None => None,
        };
        let base = out.len();
        for row in 0..batch.num_rows() {
            out.push(Record {
                key: match keys {
                    Some(k) => string_at(k, row)?.unwrap_or_default(),
                    None => (base + row).to_string(),
                },
                caption: match captions {
                    Some(c) => string_at(c, row)?,
                    None => None,
                },
                label: labels.as_ref().and_then(|l| l[row]),
            });
        }
    }
    Ok(out)
}

fn string_at(col: &ArrayRef, row: usize) -> Result<Option<String>> {
    if col.is_null(row) {
        return Ok(None);
    }
    match col.data_type() {
        DataType::Utf8 => Ok(Some(col.as_string::<i32>().value(row).to_string())),
        DataType::LargeUtf8 => Ok(Some(col.as_string::<i64>().value(row).to_string())),
        other => bail!("a string column holds {other}"),
    }
}

fn labels_of(col: &ArrayRef) -> Result<Vec<Option<i64>>> {
    fn collect<T: arrow_array::ArrowPrimitiveType>(col: &ArrayRef) -> Vec<Option<i64>>
    where
        T::Native: Into<i64>,
    {
        col.as_primitive::<T>()
            .iter()
            .map(|v| v.map(Into::into))
            .collect()
    }
    Ok(match col.data_type() {
        DataType::Int64 => collect::<Int64Type>(col),
        DataType::Int32 => collect::<Int32Type>(col),
        DataType::Int16 => collect::<Int16Type>(col),
        DataType::Int8 => collect::<Int8Type>(col),
        other => bail!("column \"label\" holds {other}, not integers"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_nulls() {
        let records = vec![
            Record {
                key: "000001".into(),
                caption: Some("a photo of a boot.".into()),
                label: Some(9),
            },
            Record {
                key: "000002".into(),
                caption: None,
                label: None,
            },
        ];
        let bytes = encode(&records).unwrap();
        assert_eq!(&bytes[..4], b"PAR1");
        assert_eq!(decode(Bytes::from(bytes), "m.parquet").unwrap(), records);
        let e = decode(Bytes::from_static(b"nope"), "m.parquet").unwrap_err();
        assert!(format!("{e:#}").starts_with("reading m.parquet as embedding metadata"));
    }
}
