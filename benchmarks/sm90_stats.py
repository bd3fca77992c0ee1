"""The LoRA dropout kernels (audiocraft_lora/dropout_triton.py) compiled for an H100 (sm_90a) on any machine, no GPU:
registers, spills, shared memory, blocks per SM, and the SASS instructions of each kernel's loop by class, per
element of the [M, K] input. What a session without a GPU can learn of a kernel change before timing it.

    python benchmarks/sm90_stats.py                  # the kernels at musicgen-small's linear2 (K 4096, rank 16)
    python benchmarks/sm90_stats.py --dump out/      # also their TTGIR, PTX and SASS

Uses Triton's bundled ptxas (`-v`: registers, spills) and nvdisasm. Session 18's reading: benchmarks/README.md."""
import argparse
import collections
import inspect
import os
from pathlib import Path
import re
import subprocess
import tempfile
import typing as tp

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from audiocraft_lora import dropout_kernels as dk
from audiocraft_lora import dropout_triton as kernels

BIN = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin'
TYPES = {'SEED': '*i64', 'PART': '*fp32', 'OUT': '*i8', 'M': 'i32', 'K': 'i32', 'R': 'i32', 'stride': 'i32',
         'scale': 'fp32', 'threshold': 'i32'}  # (the rest: bf16 tensors passed as int16 views)
DIVISIBLE = ('K', 'R', 'stride')  # (by 16 at K 4096, rank 16, as the JIT would mark them; M is not specialized)
CLASSES = (('tensor core', r'(HMMA|HGMMA|WGMMA)$'), ('memory', r'(LDG|STG|LDS|STS|LDSM|LDGSTS|LDC|ATOM|RED)$'),
           ('shuffle', r'(SHFL|PRMT)$'), ('float', r'(F[A-Z0-9]+|HADD2|HMUL2|HFMA2|I2F|MUFU)$'),
           ('integer', r'(IMAD|IADD3|LOP3|SHF|ISETP|LEA|SEL|IMNMX|VIMNMX|POPC|FLO|BMSK|PLOP3|P2R|R2P)$'),
           ('uniform', r'U'))


def compile_sm90(fn, constants: dict, warps: int):
    names = list(inspect.signature(fn.fn).parameters)
    signature, attrs = {}, {}
    for index, name in enumerate(names):
        signature[name] = 'constexpr' if name in constants else TYPES.get(name, '*i16')
        if signature[name].startswith('*') or name in DIVISIBLE:
            attrs[(index,)] = [['tt.divisibility', 16]]
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
                          target=GPUTarget('cuda', 90, 32), options={'num_warps': warps, 'num_stages': 3})


def ptxas(ptx: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, 'k.ptx').write_text(ptx)
        log = subprocess.run([str(BIN / 'ptxas'), '-v', '--gpu-name=sm_90a', f'{tmp}/k.ptx', '-o', f'{tmp}/k.cubin'],
                             capture_output=True, text=True).stderr
    number = lambda pattern: int(re.search(pattern, log).group(1))  # noqa: E731
    return {'registers': number(r'Used (\d+) registers'), 'spilled': number(r'(\d+) bytes spill stores')
            + number(r'(\d+) bytes spill loads')}


def sass(cubin: bytes) -> tp.Tuple[str, tp.List[str]]:
    """(nvdisasm's text, the loop body's instructions: the longest backward branch, else the whole kernel)."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, 'k.cubin').write_bytes(cubin)
        text = subprocess.run([str(BIN / 'nvdisasm'), '-c', str(Path(tmp, 'k.cubin'))], capture_output=True,
                              text=True).stdout
    instructions, labels, loops = [], {}, []
    for line in text.splitlines():
        label = re.match(r'^\s*(\.L_\w+):', line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        op = re.match(r'\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?(.*?);', line)
        if op:
            instructions.append(op.group(1).strip())
            target = re.match(r'BRA\s+(?:`\()?(\.L_\w+)', instructions[-1])
            if target and labels.get(target.group(1), len(instructions)) < len(instructions) - 2:
                loops.append((labels[target.group(1)], len(instructions)))
    start, end = max(loops, key=lambda span: span[1] - span[0]) if loops else (0, len(instructions))
    return text, instructions[start:end]


def report(name: str, fn, constants: dict, warps: int, dump: tp.Optional[Path]) -> dict:
    compiled = compile_sm90(fn, constants, warps)
    info = ptxas(compiled.asm['ptx'])
    text, body = sass(compiled.asm['cubin'])
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        for ext in ('ttgir', 'ptx'):
            (dump / f'{name}.{ext}').write_text(compiled.asm[ext])
        (dump / f'{name}.sass').write_text(text)
    threads = 32 * warps
    blocks = min(65536 // (-(-info['registers'] // 8) * 8 * threads), 32 // warps,
                 (228 * 1024) // (compiled.metadata.shared + 1024))
    elements = constants['BM'] * constants['BK'] / threads  # (one loop iteration's elements, per thread)
    counts = collections.Counter()
    for instruction in body:
        op = instruction.split()[0].split('.')[0]
        counts[next((kind for kind, pattern in CLASSES if re.match(pattern, op)), 'other')] += 1
    row = {'kernel': name, 'warps': warps, 'registers': info['registers'], 'spilled bytes': info['spilled'],
           'smem KB': compiled.metadata.shared // 1024, 'warps/SM': blocks * warps,
           'layout conversions': compiled.asm['ttgir'].count('convert_layout'),
           'instructions/element': len(body) / elements}
    row.update({f'{kind}/element': counts[kind] / elements for kind, _ in CLASSES + (('other', ''),)})
    return row


def main(argv: tp.Optional[tp.List[str]] = None) -> tp.List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rank', type=int, default=16)
    parser.add_argument('--k', type=int, default=4096, help="the input's width (linear2 of musicgen-small: 4096)")
    parser.add_argument('--dump', type=Path, default=None, help='write each TTGIR, PTX and SASS here')
    args = parser.parse_args(argv)
    common = {'BR': dk._block_rank(args.rank), 'BF16': True, 'LOW': True}
    grad = {'BM': dk._GRAD_BM, 'BK': dk._GRAD_BK, 'STEPS': 4, **common}
    cases = (('rank_product', kernels.rank_product_kernel, {'BM': dk._BM, 'BK': dk._BK, 'STEPS': -(-args.k // dk._BK),
                                                            'COPY': False, **common}, dk._WARPS),
             ('masked_update', kernels.masked_update_kernel, {'BM': dk._UPDATE_BM, 'BK': dk._UPDATE_BK, **common}, 4),
             ('rank_grad', kernels.rank_grad_kernel, grad, 4),
             ('masked_backward', kernels.masked_backward_kernel, grad, 4))
    rows = [report(name, fn, constants, warps, args.dump) for name, fn, constants, warps in cases]
    keys = list(rows[0])
    print(' | '.join(keys))
    for row in rows:
        print(' | '.join(f'{row[k]:.1f}' if isinstance(row[k], float) else str(row[k]) for k in keys))
    print('(instructions per element of the [M, K] input in the loop body, per thread: rank_product and rank_grad '
          'loop over blocks; masked_update has no loop, its whole kernel counts)')
    return rows


if __name__ == '__main__':
    os.environ.setdefault('TRITON_CACHE_DIR', tempfile.mkdtemp(prefix='sm90_stats_'))
    main()
