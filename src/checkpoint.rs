//! Checkpoints as safetensors. A model file holds exactly the PyTorch `state_dict` (the
//! [`ParamStore`] names and shapes; batch norm's `num_batches_tracked` as a 0-d int64), so
//! `safetensors.torch.load_file` + `load_state_dict` reads it; the [`ModelConfig`] rides in the
//! header metadata under [`CONFIG_KEY`]. A run's training state (the model again, Adam's
//! moments as `m.<name>` and `v.<name>`, and its progress) goes to a separate file. Every file is written to `<path>.tmp` and renamed into place, so a
//! crash never leaves a half-written checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::backend::Backend;
use crate::nn::{ModelConfig, Vae};
use crate::optim::Adam;
use crate::tape::ParamStore;
use crate::tensor::{Float, Tensor};

/// Metadata key of the model configuration (JSON).
pub const CONFIG_KEY: &str = "vaecuda_config";

/// One tensor read from or written to a file: dtype, shape, little-endian bytes.
#[derive(Clone, Debug)]
pub struct RawTensor {
    /// The element type as stored (F32, F64, F16, BF16 or I64 here).
    pub dtype: Dtype,
    /// The dimensions, outermost first (PyTorch's order: a linear weight is `[out, in]`).
    pub shape: Vec<usize>,
    /// The elements, little-endian, row-major: `shape`'s product times the dtype's size.
    pub bytes: Vec<u8>,
}

impl RawTensor {
    /// A float tensor of `shape` from host values (F32 or F64, as `E`).
    pub fn from_floats<E: Float>(shape: &[usize], v: &[E]) -> Self {
        let dtype = if E::NAME == "f64" { Dtype::F64 } else { Dtype::F32 };
        RawTensor { dtype, shape: shape.to_vec(), bytes: bytemuck::cast_slice(v).to_vec() }
    }
    /// A 0-d int64 tensor, as PyTorch stores batch norm's `num_batches_tracked`.
    pub fn scalar_i64(v: i64) -> Self {
        RawTensor { dtype: Dtype::I64, shape: vec![], bytes: v.to_le_bytes().to_vec() }
    }
    /// The values as floats of type `E` (from F32, F64, F16 or BF16 storage).
    pub fn to_floats<E: Float>(&self, name: &str) -> Result<Vec<E>> {
        let b = &self.bytes;
        Ok(match self.dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| E::of(f32::from_le_bytes(c.try_into().unwrap()) as f64)).collect(),
            Dtype::F64 => b.chunks_exact(8).map(|c| E::of(f64::from_le_bytes(c.try_into().unwrap()))).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| E::of(half::f16::from_le_bytes([c[0], c[1]]).to_f64())).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| E::of(half::bf16::from_le_bytes([c[0], c[1]]).to_f64())).collect(),
            d => bail!("tensor {name} has dtype {d:?}; expected a float type"),
        })
    }
    /// An integer scalar (I64 or I32 storage, shape `[]` or `[1]`).
    pub fn to_i64(&self, name: &str) -> Result<i64> {
        ensure!(
            self.shape.iter().product::<usize>() == 1,
            "tensor {name} should be a scalar, has shape {:?}",
            self.shape
        );
        Ok(match self.dtype {
            Dtype::I64 => i64::from_le_bytes(self.bytes[..8].try_into().unwrap()),
            Dtype::I32 => i32::from_le_bytes(self.bytes[..4].try_into().unwrap()) as i64,
            d => bail!("tensor {name} has dtype {d:?}; expected int64"),
        })
    }
}

/// Writes `bytes` to `path` through a temporary file (`<path>.tmp`), flushed to disk, and a
/// rename: whenever the process dies, `path` holds either its old contents or the new ones,
/// never a mix. Creates the parent directory if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let (head, tail) = bytes.split_at(bytes.len() / 2);
        f.write_all(head).with_context(|| format!("cannot write {}", tmp.display()))?;
        crate::failpoint::hit("half-written");
        f.write_all(tail).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("cannot flush {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", path.display()))?;
    // The rename itself reaches the disk when the directory is flushed (matters for power
    // loss, not for a killed process; best effort where directories cannot be opened).
    if let Ok(d) = std::fs::File::open(dir.unwrap_or(Path::new("."))) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Serializes named tensors with string metadata, atomically.
pub fn write_tensors(
    path: &Path,
    tensors: &BTreeMap<String, RawTensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    write_atomic(path, &serialize(tensors, &metadata)?)
}

/// The safetensors bytes of `tensors`: an 8-byte little-endian header length, the JSON header
/// (metadata and each tensor's dtype, shape and byte range), padded with spaces to a multiple
/// of 8, then the data in name order. Written here rather than by `safetensors::serialize`,
/// whose header keeps the metadata in a HashMap: its order changed from process to process,
/// so a resumed run's checkpoint differed from an uninterrupted run's in the header alone.
/// Here every key is sorted, and the bytes depend on the contents only.
pub fn serialize(tensors: &BTreeMap<String, RawTensor>, metadata: &HashMap<String, String>) -> Result<Vec<u8>> {
    use serde_json::{json, Map, Value};
    let mut header = Map::new(); // serde_json's Map keeps its keys sorted
    if !metadata.is_empty() {
        let sorted: BTreeMap<&String, &String> = metadata.iter().collect();
        header.insert("__metadata__".to_string(), json!(sorted));
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        // Checks that the bytes fit the dtype and shape, as the reader will.
        TensorView::new(t.dtype, t.shape.clone(), &t.bytes).map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))?;
        let end = offset + t.bytes.len();
        let entry = json!({ "dtype": format!("{:?}", t.dtype), "shape": t.shape, "data_offsets": [offset, end] });
        header.insert(name.clone(), entry);
        offset = end;
    }
    let mut head = serde_json::to_vec(&Value::Object(header))?;
    head.resize(head.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend((head.len() as u64).to_le_bytes());
    out.extend(head);
    for t in tensors.values() {
        out.extend(&t.bytes);
    }
    Ok(out)
}

/// A safetensors file read into memory.
#[derive(Clone, Debug)]
pub struct TensorFile {
    /// Where it was read from (named in every error about it).
    pub path: PathBuf,
    /// The header's `__metadata__` strings (the model configuration, the epoch, ...).
    pub metadata: HashMap<String, String>,
    /// The tensors by name, sorted.
    pub tensors: BTreeMap<String, RawTensor>,
}

impl TensorFile {
    /// Reads and checks a whole file (header, dtypes, shapes and byte ranges); an error names
    /// the file and says what is wrong.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is not a safetensors file ({e})", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is not a safetensors file ({e})", path.display()))?;
        let tensors = st
            .iter()
            .map(|(n, v)| {
                (n.to_string(), RawTensor { dtype: v.dtype(), shape: v.shape().to_vec(), bytes: v.data().to_vec() })
            })
            .collect();
        Ok(TensorFile { path: path.to_path_buf(), metadata: meta.metadata().clone().unwrap_or_default(), tensors })
    }

    /// The model configuration stored in the metadata, if any.
    pub fn config(&self) -> Result<Option<ModelConfig>> {
        match self.metadata.get(CONFIG_KEY) {
            None => Ok(None),
            Some(j) => Ok(Some(
                serde_json::from_str(j)
                    .with_context(|| format!("{}: unreadable model configuration in metadata", self.path.display()))?,
            )),
        }
    }

    fn get(&self, name: &str) -> Result<&RawTensor> {
        self.tensors.get(name).with_context(|| format!("{} has no tensor {name}", self.path.display()))
    }

    /// Overwrites every tensor of `store` with the file's, insisting the names and shapes are
    /// exactly those of the model (as PyTorch's strict `load_state_dict`).
    pub fn load_into<B: Backend>(&self, backend: &B, store: &mut ParamStore<B>) -> Result<()> {
        let p = self.path.display();
        for i in 0..store.len() {
            let name = &store.names[i];
            let t = self.get(name).with_context(|| format!("{p} does not fit this architecture"))?;
            let want = &store.values[i].shape;
            ensure!(
                &t.shape == want,
                "{p} does not fit this architecture: tensor {name} has shape {:?} in the file but the model needs {want:?}",
                t.shape
            );
            let v: Vec<B::E> = t.to_floats(name)?;
            store.values[i] = Tensor::from_host(backend, want, &v);
        }
        let names: Vec<String> = store.counters.keys().cloned().collect();
        for name in names {
            let v = self.get(&name).with_context(|| format!("{p} does not fit this architecture"))?.to_i64(&name)?;
            store.counters.insert(name, v.max(0) as u64);
        }
        let unexpected: Vec<&String> =
            self.tensors.keys().filter(|n| store.find(n).is_none() && !store.counters.contains_key(*n)).collect();
        ensure!(
            unexpected.is_empty(),
            "{p} does not fit this architecture: unexpected tensor {} (shape {:?})",
            unexpected[0],
            self.tensors[unexpected[0]].shape
        );
        Ok(())
    }
}

/// The model's tensors as they go into a file.
pub fn model_tensors<B: Backend>(backend: &B, store: &ParamStore<B>) -> BTreeMap<String, RawTensor> {
    let mut out = BTreeMap::new();
    for i in 0..store.len() {
        let v = store.values[i].to_host(backend);
        out.insert(store.names[i].clone(), RawTensor::from_floats(&store.values[i].shape, &v));
    }
    for (name, &c) in &store.counters {
        out.insert(name.clone(), RawTensor::scalar_i64(c as i64));
    }
    out
}

/// Writes a model file: the state_dict plus the configuration (and any extra metadata).
pub fn save_model<B: Backend>(
    path: &Path,
    backend: &B,
    store: &ParamStore<B>,
    config: &ModelConfig,
    extra: &[(&str, String)],
) -> Result<()> {
    let mut meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (CONFIG_KEY.to_string(), serde_json::to_string(config)?),
    ]);
    for (k, v) in extra {
        meta.insert(k.to_string(), v.clone());
    }
    write_tensors(path, &model_tensors(backend, store), meta)
}

/// A model rebuilt from a checkpoint.
pub struct LoadedModel<B: Backend> {
    /// The configuration it was built from (the file's, or the fallback).
    pub config: ModelConfig,
    /// The model's structure (parameter ids into `store`).
    pub vae: Vae,
    /// The parameters, holding the file's values.
    pub store: ParamStore<B>,
    /// The file as read (its metadata, e.g. `vaecuda_recon`, is the caller's to use).
    pub file: TensorFile,
}

/// Reads a model file. Its metadata supplies the configuration; a file without one (saved by
/// PyTorch) needs `fallback` (from the command line).
pub fn load_model<B: Backend>(path: &Path, backend: &B, fallback: Option<ModelConfig>) -> Result<LoadedModel<B>> {
    let file = TensorFile::read(path)?;
    let config = match (file.config()?, fallback) {
        (Some(c), _) => c,
        (None, Some(c)) => c,
        (None, None) => bail!(
            "{} has no vaecuda configuration in its metadata (saved by PyTorch?); pass --arch and the sizes",
            path.display()
        ),
    };
    crate::nn::vae::validate(&config)?;
    // The model is built before the file's tensors are checked against it (which then names
    // the first tensor that differs): a configuration that asks for far more parameters than
    // the file holds values is refused first, so a damaged header cannot make us allocate
    // more than a small multiple of the file's size.
    let params = crate::nn::vae::parameter_count(&config);
    let stored: u64 = file.tensors.values().map(|t| t.shape.iter().product::<usize>() as u64).sum();
    ensure!(
        params <= 2 * stored + (1 << 20),
        "{} does not fit its configuration: the model has {params} parameters but the file holds {stored} values",
        path.display()
    );
    let mut store = ParamStore::default();
    let vae = Vae::new(config.clone(), &mut store, backend, 0);
    file.load_into(backend, &mut store)?;
    Ok(LoadedModel { config, vae, store, file })
}

/// Prefix of the model's tensors inside a training-state file.
const MODEL_PREFIX: &str = "model.";

/// Writes everything a run needs to continue bit-exactly: the model (`model.<name>`), Adam's
/// moments (`m.<name>`, `v.<name>`) and step, and a JSON blob of the caller's progress. One
/// file, written atomically, so it is the run's commit point: a training state is either
/// wholly the old one or wholly the new one, whatever moment the process dies at.
pub fn save_training_state<B: Backend>(
    path: &Path,
    backend: &B,
    adam: &Adam<B>,
    store: &ParamStore<B>,
    state_json: String,
) -> Result<()> {
    let mut t: BTreeMap<String, RawTensor> =
        model_tensors(backend, store).into_iter().map(|(n, v)| (format!("{MODEL_PREFIX}{n}"), v)).collect();
    for i in 0..store.len() {
        if let (Some(m), Some(v)) = (&adam.m[i], &adam.v[i]) {
            let shape = &store.values[i].shape;
            t.insert(format!("m.{}", store.names[i]), RawTensor::from_floats(shape, &backend.download(m)));
            t.insert(format!("v.{}", store.names[i]), RawTensor::from_floats(shape, &backend.download(v)));
        }
    }
    let meta =
        HashMap::from([("vaecuda_optimizer".to_string(), state_json), ("adam_step".into(), adam.step.to_string())]);
    write_tensors(path, &t, meta)
}

/// Restores what [`save_training_state`] wrote into `store` and `adam`; returns the JSON
/// progress blob, and whether the file held the model (files from before the model moved
/// into it hold only the optimizer: the caller then loads the model from its checkpoint).
pub fn load_training_state<B: Backend>(
    path: &Path,
    backend: &B,
    adam: &mut Adam<B>,
    store: &mut ParamStore<B>,
) -> Result<(String, bool)> {
    let f = TensorFile::read(path)?;
    let model: BTreeMap<String, RawTensor> = f
        .tensors
        .iter()
        .filter_map(|(n, t)| n.strip_prefix(MODEL_PREFIX).map(|n| (n.to_string(), t.clone())))
        .collect();
    let has_model = !model.is_empty();
    if has_model {
        TensorFile { path: f.path.clone(), metadata: HashMap::new(), tensors: model }.load_into(backend, store)?;
    }
    for i in 0..store.len() {
        if adam.m[i].is_some() {
            let name = &store.names[i];
            for (slot, prefix) in [(&mut adam.m[i], "m"), (&mut adam.v[i], "v")] {
                let key = format!("{prefix}.{name}");
                let t = f.get(&key)?;
                ensure!(
                    t.shape == store.values[i].shape,
                    "{}: tensor {key} has shape {:?}, expected {:?}",
                    path.display(),
                    t.shape,
                    store.values[i].shape
                );
                *slot = Some(backend.upload(&t.to_floats::<B::E>(&key)?));
            }
        }
    }
    adam.step = f
        .metadata
        .get("adam_step")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{} has no adam_step", path.display()))?;
    let json = f
        .metadata
        .get("vaecuda_optimizer")
        .cloned()
        .with_context(|| format!("{} has no optimizer state", path.display()))?;
    Ok((json, has_model))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same contents give the same bytes (metadata given in any order), and the file
    /// reads back, through the safetensors crate, to the same tensors and metadata.
    #[test]
    fn bytes_depend_on_contents_only_and_read_back() {
        let tensors = BTreeMap::from([
            ("b".to_string(), RawTensor::from_floats::<f32>(&[3], &[1.0, 2.0, 3.0])),
            ("a.weight".to_string(), RawTensor::from_floats::<f64>(&[2, 2], &[0.5, -1.0, 2.0, 4.0])),
            ("n".to_string(), RawTensor::scalar_i64(7)),
        ]);
        let pairs: Vec<(String, String)> = (0..20).map(|i| (format!("key{i}"), format!("value {i}"))).collect();
        let forward: HashMap<String, String> = pairs.iter().cloned().collect();
        let backward: HashMap<String, String> = pairs.iter().rev().cloned().collect();
        let (one, two) = (serialize(&tensors, &forward).unwrap(), serialize(&tensors, &backward).unwrap());
        assert_eq!(one, two);
        let (n, meta) = safetensors::SafeTensors::read_metadata(&one).unwrap();
        assert_eq!(n % 8, 0);
        assert_eq!(meta.metadata().clone().unwrap(), forward);
        let st = safetensors::SafeTensors::deserialize(&one).unwrap();
        for (name, t) in &tensors {
            let v = st.tensor(name).unwrap();
            assert_eq!((v.dtype(), v.shape(), v.data()), (t.dtype, &t.shape[..], &t.bytes[..]));
        }
    }
    use crate::nn::Arch;
    use crate::Cpu;

    #[test]
    fn model_round_trips_and_mismatch_names_the_tensor() {
        let be = Cpu::<f32>::default();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut cfg = ModelConfig::mnist(Arch::ConvBn);
        cfg.hiddens = vec![4, 8];
        cfg.latent = 3;
        let mut store = ParamStore::<Cpu<f32>>::default();
        Vae::new(cfg.clone(), &mut store, &be, 5);
        *store.counters.values_mut().next().unwrap() = 7;
        save_model(&path, &be, &store, &cfg, &[]).unwrap();
        let loaded = load_model::<Cpu<f32>>(&path, &be, None).unwrap();
        assert_eq!(loaded.config, cfg);
        for i in 0..store.len() {
            assert_eq!(store.values[i].buf, loaded.store.values[i].buf, "{}", store.names[i]);
        }
        assert_eq!(store.counters, loaded.store.counters);

        let mut other = cfg.clone();
        other.latent = 4;
        let err = TensorFile::read(&path)
            .unwrap()
            .load_into(&be, &mut {
                let mut s = ParamStore::default();
                Vae::new(other, &mut s, &be, 0);
                s
            })
            .unwrap_err();
        assert!(format!("{err:#}").contains("fc_mu.weight has shape [3, 392]"), "{err:#}");
    }
}
