"""Reading the CPU's int8 dot-product and bf16 flags from /proc/cpuinfo text (written by hand below)."""
from __future__ import annotations

from anoclip.runtime.cpu_features import CpuFeatures, parse_cpuinfo, read_cpu_features

# Shortened /proc/cpuinfo blocks in the kernel's format ("key\t: value"); the flag names are the
# kernel's (arch/x86/include/asm/cpufeatures.h: avx512_vnni, avx_vnni, amx_int8, avx512_bf16, amx_bf16).
EPYC_AVX2 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
             "flags\t\t: fpu sse sse2 fma avx avx2 bmi2 vaes\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n")
CASCADE_LAKE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
ALDER_LAKE = "processor\t: 0\nflags\t\t: avx2 avx_vnni\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd asimddp bf16 i8mm\n"


def test_avx2_only_cpu_has_neither_int8_dot_nor_bf16():
    f = parse_cpuinfo(EPYC_AVX2)
    assert f.int8_dot is False and f.native_bf16 is False
    assert "avx2" in f.flags and "fpu" in f.flags


def test_vnni_alone_is_int8_dot_without_bf16():
    f = parse_cpuinfo(CASCADE_LAKE)
    assert f.int8_dot is True and f.native_bf16 is False


def test_amx_cpu_has_both_and_avx_vnni_counts_as_int8_dot():
    assert parse_cpuinfo(SAPPHIRE_RAPIDS).int8_dot is True
    assert parse_cpuinfo(SAPPHIRE_RAPIDS).native_bf16 is True
    assert parse_cpuinfo(ALDER_LAKE).int8_dot is True and parse_cpuinfo(ALDER_LAKE).native_bf16 is False


def test_flag_names_match_whole_words_not_substrings():
    f = parse_cpuinfo("flags\t: avx512_vnni_like amx_int8x\n")  # not the kernel's names
    assert f.int8_dot is False


def test_arm_features_and_unreadable_files_are_unknown(tmp_path):
    assert parse_cpuinfo(ARM).int8_dot is None and parse_cpuinfo(ARM).native_bf16 is None
    missing = read_cpu_features(tmp_path / "no-cpuinfo")
    assert missing == CpuFeatures(None, str(tmp_path / "no-cpuinfo")) and missing.int8_dot is None


def test_read_cpu_features_reads_the_file(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(SAPPHIRE_RAPIDS)
    assert read_cpu_features(path).int8_dot is True
