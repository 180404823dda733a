"""Ahead-of-time compiles for a TPU slice from any host, and what a compiled step reports (experiments/compile_check).

With libtpu installed (requirements-tpu.txt), `jax.experimental.topologies.get_topology_desc` describes a slice such
as v5e:2x4 without one: a mesh over its devices lowers and compiles with the real TPU compiler on a CPU-only machine,
and the compiled step's memory analysis is the TPU's (libtpu also refuses a step that exceeds a device's HBM).
"""

import dataclasses
import importlib.util
import re

from lenvm_jax.errors import UserError

# HBM per device that libtpu makes available to a program ("exceeds available HBM (15.75G)"), by the device_kind of
# a topology's devices. Measured here with libtpu 0.0.42.1; a v4 topology lists each TensorCore as a device.
AVAILABLE_HBM_GIB = {"TPU v4": 15.25, "TPU v5 lite": 15.75, "TPU v5": 95.74, "TPU v6 lite": 31.25}


def has_libtpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> list:
  """The devices of a TPU topology (e.g. "v5e:2x4", "v5p:2x2x4", "v4:2x2x2") to build a mesh on and compile for."""
  if not has_libtpu():
    raise UserError(f"--topology={name} needs libtpu to compile for TPU: pip install -r requirements-tpu.txt "
                    "(best in its own venv: docs/scaling.md)")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top  (loads libtpu)
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
  except Exception as e:  # pylint: disable=broad-except  (libtpu's error types are not public)
    raise UserError(f"--topology={name}: libtpu cannot describe it ({' '.join(str(e).split())[:300]}); use a "
                    "name such as v5e:2x4, v5p:2x2x4, v4:2x2x2 or v6e:2x4") from None


def available_hbm_bytes(device) -> int | None:
  """HBM a program may use on `device` (a TPU), or None when unknown (CPU, or a TPU kind not in the table)."""
  gib = AVAILABLE_HBM_GIB.get(getattr(device, "device_kind", ""))
  return None if gib is None else int(gib * 2**30)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Per-device bytes of one compiled step (compiled.memory_analysis()), against the device's HBM when known."""
  arguments: int
  outputs: int
  aliased: int  # Outputs that reuse donated argument buffers (the train state), counted once.
  temporaries: int
  generated_code: int
  host_temporaries: int  # In host memory (remat="offload"), not HBM.
  capacity: int | None

  @classmethod
  def of(cls, compiled, capacity: int | None) -> "MemoryReport":
    m = compiled.memory_analysis()
    return cls(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
               temporaries=m.temp_size_in_bytes, generated_code=m.generated_code_size_in_bytes,
               host_temporaries=getattr(m, "host_temp_size_in_bytes", 0), capacity=capacity)

  @property
  def total(self) -> int:
    """Peak HBM the step needs: its arguments, the outputs that are not aliased to them, temporaries and code."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

  @property
  def fits(self) -> bool:
    return self.capacity is None or self.total <= self.capacity

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "total": self.total, "fits": self.fits}


def out_of_memory(error: BaseException) -> str | None:
  """libtpu's refusal of a step that does not fit in HBM, as one line, or None for any other compile error."""
  text = " ".join(str(error).split())
  if "RESOURCE_EXHAUSTED" not in text and not re.search(r"exceeds available HBM|Ran out of memory", text):
    return None
  found = re.search(r"(Ran out of memory[^.]*\.?[^.]*exceeds available HBM \([^)]*\))", text)
  return found.group(1) if found else text[:400]


_MAXTEXT_STATS = re.compile(r"Memory analysis: CompiledMemoryStats\((.*?)\)")
_MAXTEXT_FLOPS = re.compile(r"Cost analysis: \{.*?'flops': ([0-9.e+]+)")
_MAXTEXT_DEVICES = re.compile(r"Num_devices: (\d+)")


def parse_maxtext_report(text: str) -> dict | None:
  """Memory and FLOPs per chip from what MaxText's train_compile prints (its CompiledMemoryStats and cost analysis
  lines), for experiments/bench_compile.py; None when they are missing (the compile failed)."""
  stats, flops, devices = _MAXTEXT_STATS.search(text), _MAXTEXT_FLOPS.search(text), _MAXTEXT_DEVICES.search(text)
  if not stats or not flops:
    return None
  memory = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", stats.group(1))}
  total = (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"] - memory["alias_size_in_bytes"] +
           memory["temp_size_in_bytes"] + memory["generated_code_size_in_bytes"])
  return {"devices": int(devices.group(1)) if devices else None, "temporaries": memory["temp_size_in_bytes"],
          "arguments": memory["argument_size_in_bytes"], "total": total,
          "compiled_flops_per_device": float(flops.group(1))}
