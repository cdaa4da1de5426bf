"""The built-in gene signature library, each set with its source, a category and a description,
and the resolver that matches a signature (a library name or typed genes) to a model's panel.

Scores are computed in :mod:`core.analysis.signature_scores` (per tile: ``score_genes`` or
``mean_z``) and, for patient-level cohort analyses, in :mod:`core.analysis.variables` (the mean of
per-gene patient values z-scored over the cohort).

Gene symbols are HGNC symbols as the sources print them (some sources use older symbols, e.g.
``CTSL2``; a symbol that a panel spells differently is reported as missing, never guessed).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from core.errors import TesseraError

CATEGORIES: dict[str, str] = {
    "proliferation": "Proliferation", "t_cytotoxic": "T cell / cytotoxic", "b_plasma": "B / plasma cells",
    "myeloid": "Myeloid", "caf_stroma": "CAF / stroma", "endothelial": "Endothelial",
    "er_luminal": "ER / luminal", "her2": "HER2 amplicon", "invasion": "Invasion",
    "scsubtype": "SCSubtype (Wu et al. 2021)",
}


class Signature(NamedTuple):
    genes: tuple[str, ...]
    source: str          # the citation: authors, journal, year, table/figure (or "curated from …")
    category: str        # a key of CATEGORIES
    description: str     # one line


def _g(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_WU = "Wu S.Z. et al., Nat Genet 2021;53:1334–1347"
# Wu et al.'s Garnett cell-type marker file (garnett_breast_cancer_TME_markers_v4.txt, in the
# paper's code: github Swarbricklab-code/BrCa_cell_atlas): the "expressed:" genes of one section.
_GARNETT = _WU + ", Garnett marker file garnett_breast_cancer_TME_markers_v4.txt, section “{}”"
# Wu et al. Supplementary Table S4, the SCSubtype gene signatures. The table was written by R,
# whose make.names turned "-" into "." (HLA.DRA); the symbols below are restored (HLA-DRA), and
# AP000769.1 keeps its real dot. tests/unit/test_signatures.py checks them against the table.
_SCSUBTYPE = _WU + ", Supplementary Table S4 (SCSubtype gene signatures), column {}"
_DANAHER = ("Danaher P. et al., J Immunother Cancer 2017;5:18 (“Gene expression markers of tumor infiltrating "
            "leukocytes”), cell-type marker genes: {}")

# Gene lists as the sources print them (see the citations in SIGNATURES).
_GARNETT_CD8_T_CELLS = _g("""
CD8A CD8B CD27 CTSW CX3CR1 GZMH GZMK DNAJB1 KLRB1 LAIR2 LY9 PTGDR PTPN4 RBL2 FBXW4 TSPAN32 KLRG1
CD160 RWDD3 IPCEF1 SIRPG NAA16 FAM134C
""")
_GARNETT_NK_CELLS = _g("""
FASLG CD247 GZMB IL2RB LIM2 PRF1 PTGDR NCR1 NMUR1 GNLY CD160 TBX21
""")
_GARNETT_B_CELLS = _g("""
CD79B BLK CD19 MS4A1 CD22 CD79A PNOC SNX2 MBD4 STAG3 PWP1 SP140 GGA2 STAP1 FCRL2 SMC6
""")
_GARNETT_PLASMA_CELLS = _g("""
JCHAIN IGKC IGHG1 IGHG2 IGHG3 IGHG4 AMPD1 TNFRSF17 CCNC CD79A FKBP2 GOLGA3 HSF4 KCNN3 MGAT2 PNOC
RGS13 SRP54 SSR4 HSP90B1 UBE2G1 RNF113A MANF RNGTT EBAG9 PREB MRPS31 SEC24A FNDC3A ATF6 MAST1 UBXN4
TBL2 SERP1 ALG5 GMPPA YIPF1 LAX1 TMEM39A LTB4R2 SPATS2 UBA5 ADM2 ZBP1 USP48 MTDH IMP4
""")
_GARNETT_MYELOID = _g("""
BMX CA4 CEACAM3 FCGR3B FPR2 CXCR1 CXCR2 MEFV AATK P2RY13 TREM1 VNN3 MMP25 BTNL8 TRPM6 CD1B CD1E CD86
FCER2 CCL17 ALDH1A2 RRP1B KCNK13 AZU1 MS4A3 CLC CPA3 CRHBP CTSG ELANE MS4A2 FLT3 HDC MPO SERPINB10
PRG2 PRTN3 RNASE2 RNASE3 EPX NAALADL1 HPGDS ACP2 ATOX1 ATP6V0C ATP6V1E1 C1QA CD9 CD48 CLCN7 CCR1
CRYBB1 CYBB FCER1G FDX1 FOLR2 FPR3 FTL HEXA HEXB KCNJ5 LAIR1 M6PR MDH1 NUBP1 P2RX7 RAC1 CCL8 CCL22
STX4 TCEB1 TYROBP VAMP8 MARCO CD84 ATP6V0E1 ATP6V1F CD163 CIAO1 LY86 ARHGEF11 HS3ST2 ARPC4 ATP6AP2
BAIAP2 PRDX3 ERP29 LILRB5 SDS LILRB4 VSIG4 FKBP15 ZZZ3 SIGLEC7 SIGLEC9 ADAMDEC1 ORMDL2 COMMD9 SPG21
MS4A4A UBE2D4 TRAPPC2L TREM2 TMEM70 ARL8B TMEM126B SLAMF8 C12orf4 HAMP GUF1 YIF1B AIF1 APAF1 RHOA
RHOG ARNT ASGR2 C3AR1 CASP5 TNFRSF8 CD33 CSF1R CSF3R FCAR FCN1 HCK HK3 HRH2 HSPA6 KCNMB1 MAP3K3 MNDA
MYO1F CFP PHKG2 PTGIR RARA S100A12 UBE2D1 UPK3A VASP BEST1 LST1 NUP214 IQGAP1 ATP6V0D1 CD101 EIF4E2
CALCOCO2 LILRB2 TGOLN2 CAMKK2 LILRB1 CD300C FGL2 LILRA1 LILRB3 LILRA2 TREX1 GABARAP RPH3A ACAP2
CLEC5A IL17RA FBXL5 CLEC4E VENTX PILRA METTL9 TLR7 TLR8 RIN2 RHOT1 TMEM127 TMEM9B RETN RPGRIP1
DENND1A DPEP2 MS4A6A OSBPL11 LILRA5 CCR2 PPM1F SNX17 GIT2 USP15 RGS19 RTN3 CLEC10A OGFR WWP2 AKAP13
CD93 SPEN KDM6B STAB1 KLHL18 ANKS1A SIN3B DNAJC13 KIAA1033 SUN1 SIK3 SEC11A PADI4 STX12 PGLS FAM32A
PTPN18 COQ2 CECR5 NKIRAS2 STRN4 CLEC4A RBM41 NPLOC4 WDR11 NSFL1C PCTP MTMR14 ATG3 AHNAK TSEN34
MBOAT7 CARS2 DOK3 PANK2 FBXO11 SPG11 USP48 DHX57 SLC38A10 PIKFYVE HIPK1 JMJD1C
""")
_GARNETT_CAFS = _g("""
PDGFRB PDGFRA PDPN DCN COL1A1 COL1A2 FAP THY1 CXCL12 MCAM ACTA2 MYLK MYL9 TAGLN CALD1 CAV1 MEF2C
NOTCH3 RGS5
""")
_GARNETT_ENDOTHELIAL = _g("""
PECAM1 ACKR1 ACVRL1 ANXA3 ART4 BMX ERG FLT1 GJA4 GPR4 HTR2B KDR KRT19 TACSTD2 PDE3A RALA MAPK12 SELE
SNTB2 TIE1 CLDN5 VWF HYAL2 EIF2B2 TNFSF18 GDF3 IGF2BP3 ARHGEF15 MMRN1 CD93 CLEC1A EMCN SOX18 ROBO4
RASIP1 CXorf36 MMRN2 FAM124B MYCT1 KANK3
""")
_BASAL_SC = _g("""
EMP1 TAGLN TTYH1 RTN4 TK1 BUB3 IGLV3-25 FAM3C TMEM123 KDM5B KRT14 ALG3 KLK6 EEF2 NSMCE4A LYST DEDD
HLA-DRA PAPOLA SOX4 ACTR3B EIF3D CACYBP RARRES1 STRA13 MFGE8 FRZB SDHD UCHL1 TMEM176A CAV2 MARCO
P4HB CHI3L2 APOE ATP1B1 C6orf15 KRT6B TAF1D ACTA2 LY6D SAA2 CYP27A1 DLK1 IGKV1-5 CENPW RAB18
TNFRSF11B VPS28 HULC KRT16 CDKN2A AHNAK2 SEC22B CDC42EP1 HMGA1 CAV1 BAMBI TOMM22 ATP6V0E2 MTCH2
PRSS21 HDAC2 ZG16B GAL SCGB1D2 S100A2 GSPT1 ARPC1B NIT1 NEAT1 DSC2 RP1-60O19.1 MAL2 TMEM176B CYP1B1
EIF3L FKBP4 WFDC2 SAA1 CXCL17 PFDN2 UCP2 RAB11B FDCSP HLA-DPB1 PCSK1N C4orf48 CTSC
""")
_HER2E_SC = _g("""
PSMA2 PPP1R1B SYNGR2 CNPY2 LGALS7B CYBA FTH1 MSL1 IGKV3-15 STARD3 HPD HMGCS2 ID3 NDUFB8 COTL1 AIM1
MED24 CEACAM6 FABP7 CRABP2 NR4A2 COX14 ACADM PKM ECH1 C17orf89 NGRN ATG5 SNHG25 ETFB EGLN3 CSNK2B
RHOC PSENEN CDK12 ATP5I ENTHD2 QRSL1 S100A7 TPM1 ATP5C1 HIST1H1E LGALS1 GRB7 AQP3 ALDH2 EIF3E ERBB2
LCN2 SLC38A10 TXN DBI RP11-206M11.7 TUBB CRYAB CD9 PDSS2 XIST MED1 C6orf203 PSMD3 TMC5 UQCRQ EFHD1
BCAM GPX1 EPHX1 AREG CDK2AP2 SPINK8 PGAP3 NFIC THRSP LDHB MT1X HIST1H4C LRRC26 SLC16A3 BACE2 MIEN1
AR CRIP2 NME1 DEGS2 CASC3 FOLR1 SIVA1 SLC25A39 IGHG1 ORMDL3 KRT81 SCGB2B2 LINC01285 CXCL8 KRT15 RSU1
ZFP36L2 DKK1 TMED10 IRX3 S100A9 YWHAZ
""")
_LUMA_SC = _g("""
SH3BGRL HSPB1 PHGR1 SOX9 CEBPD CITED2 TM4SF1 S100P KCNK6 AGR3 MPC2 CXCL13 RNASET2 DDIT4 SCUBE2 KRT8
MZT2B IFI6 RPS26 TAGLN2 SPTSSA ZFP36L1 MGP KDELR2 PPDPF AZGP1 AP000769.1 MYBPC1 S100A1 TFPI2 JUN
SLC25A6 HSP90AB1 ARF5 PMAIP1 TNFRSF12A FXYD3 RASD1 PYCARD PYDC1 PHLDA2 BZW2 HOXA9 XBP1 AGR2 HSP90AA1
""")
_LUMB_SC = _g("""
UGCG ARMT1 ISOC1 GDF15 ZFP36 PSMC5 DDX5 TMEM150C NBEAL1 CLEC3A GADD45G MARCKS FHL2 CCDC117 LY6E GJA1
PSAP TAF7 PIP HSPA2 DSCAM-AS1 PSMB7 STARD10 ATF3 WBP11 MALAT1 C6orf48 HLA-DRB1 HIST1H2BD CCND1 STC2
NR4A1 NPY1R FOS ZFAND2A CFL1 RHOB LMNA SLC40A1 CYB5A SRSF5 SEC61G CTSD DNAJC12 IFITM1 MAGED2 RBP1
TFF1 APLP2 TFF3 TRH NUPR1 EMC3 TXNIP ARPC4 KCNE4 ANPEP MGST1 TOB1 ADIRF TUBA1B MYEOV2 MLLT4 DHRS2
IFITM2
""")


SIGNATURES: dict[str, Signature] = {
    # -- proliferation
    # Paik S. et al., N Engl J Med 2004;351:2817–2826 (the 21-gene recurrence score): its gene groups.
    "oncotype_proliferation": Signature(
        _g("MKI67 AURKA BIRC5 CCNB1 MYBL2"), "Paik et al., N Engl J Med 2004;351:2817, recurrence-score "
        "proliferation group", "proliferation", "Oncotype DX proliferation genes."),
    "pam50_proliferation": Signature(
        _g("BIRC5 CCNB1 CDC20 NUF2 CEP55 NDC80 MKI67 PTTG1 RRM2 TYMS UBE2C"),
        "Nielsen T.O. et al., Clin Cancer Res 2010;16:5222–5232, the PAM50 proliferation score (11 PAM50 genes; "
        "CDCA1 = NUF2, KNTC2 = NDC80)", "proliferation", "PAM50 proliferation genes (cell cycle, mitosis)."),
    # -- T cells / cytotoxicity
    # Rooney M.S. et al., Cell 2015;160:48–61: cytolytic activity = geometric mean of GZMA and PRF1.
    "cytolytic": Signature(_g("GZMA PRF1"), "Rooney et al., Cell 2015;160:48–61, cytolytic activity (CYT)",
                           "t_cytotoxic", "Cytolytic activity of T and NK cells (granzyme A, perforin)."),
    "garnett_t_cells": Signature(_g("CD3D CD3E CD3G"), _GARNETT.format("T cells"), "t_cytotoxic",
                                 "Pan-T-cell CD3 complex."),
    "garnett_cd8_t_cells": Signature(
        _GARNETT_CD8_T_CELLS, _GARNETT.format("CD8 T cells"), "t_cytotoxic",
        "CD8+ T cells."),
    "garnett_nk_cells": Signature(
        _GARNETT_NK_CELLS, _GARNETT.format("NK Cells"), "t_cytotoxic",
        "NK cells (cytotoxic granules, NK receptors)."),
    "danaher_cytotoxic": Signature(_g("PRF1 GZMA GZMB NKG7 GZMH KLRK1 KLRB1 KLRD1 CTSW GNLY"),
                                   _DANAHER.format("cytotoxic cells"), "t_cytotoxic", "Cytotoxic lymphocytes."),
    "danaher_t_cells": Signature(_g("CD6 CD3D CD3E SH2D1A TRAT1 CD3G"), _DANAHER.format("T cells"), "t_cytotoxic",
                                 "T cells."),
    # -- B and plasma cells
    "garnett_b_cells": Signature(_GARNETT_B_CELLS, _GARNETT.format("B cells"), "b_plasma", "B cells."),
    "garnett_plasma_cells": Signature(
        _GARNETT_PLASMA_CELLS, _GARNETT.format("Plasma cells"), "b_plasma",
        "Plasma cells (immunoglobulins, secretory machinery)."),
    "danaher_b_cells": Signature(_g("BLK CD19 FCRL2 MS4A1 KIAA0125 TNFRSF17 TCL1A SPIB PNOC"),
                                 _DANAHER.format("B cells (KIAA0125 is FAM30A today)"), "b_plasma", "B cells."),
    # -- myeloid
    "garnett_myeloid": Signature(
        _GARNETT_MYELOID, _GARNETT.format("Myeloid cells"), "myeloid",
        "Myeloid cells (macrophages, monocytes, dendritic, granulocytic, mast)."),
    "danaher_macrophages": Signature(_g("CD68 CD84 CD163 MS4A4A"), _DANAHER.format("macrophages"), "myeloid",
                                     "Macrophages."),
    # -- stroma, vessels
    "garnett_cafs": Signature(
        _GARNETT_CAFS, _GARNETT.format("CAFs"), "caf_stroma",
        "Cancer-associated fibroblasts and perivascular cells."),
    "garnett_endothelial": Signature(
        _GARNETT_ENDOTHELIAL, _GARNETT.format("Endothelial"), "endothelial",
        "Endothelial cells (the file's list, KRT19 and TACSTD2 included)."),
    # -- ER / luminal
    "oncotype_er": Signature(_g("ESR1 PGR BCL2 SCUBE2"), "Paik et al., N Engl J Med 2004;351:2817, recurrence-score "
                             "oestrogen group", "er_luminal", "Oncotype DX oestrogen-receptor genes."),
    "pam50_luminal": Signature(
        _g("ESR1 PGR FOXA1 BCL2 MAPT NAT1 SLC39A6 MLPH CXXC5 BAG1 GPR160 BLVRA"),
        "curated from the PAM50 genes (Parker J.S. et al., J Clin Oncol 2009;27:1160–1167) of the luminal "
        "(oestrogen-receptor) cluster", "er_luminal", "Luminal / oestrogen-receptor program."),
    # -- HER2
    "oncotype_her2": Signature(_g("ERBB2 GRB7"), "Paik et al., N Engl J Med 2004;351:2817, recurrence-score HER2 group",
                               "her2", "Oncotype DX HER2 genes."),
    "her2_amplicon_17q12": Signature(
        _g("PPP1R1B STARD3 TCAP PNMT PGAP3 ERBB2 MIEN1 GRB7 IKZF3"),
        "curated: the genes of the core ERBB2 amplicon at 17q12, PPP1R1B to IKZF3 in chromosome order",
        "her2", "Genes co-amplified with ERBB2 at 17q12."),
    # -- invasion
    "oncotype_invasion": Signature(_g("MMP11 CTSV"), "Paik et al., N Engl J Med 2004;351:2817, recurrence-score "
                                   "invasion group (CTSL2 = CTSV)", "invasion", "Oncotype DX invasion genes."),
    # -- Wu et al. 2021 SCSubtype (single-cell derived intrinsic subtype signatures)
    "Basal_SC": Signature(
        _BASAL_SC, _SCSUBTYPE.format("Basal_SC"), "scsubtype",
        "Basal-like cancer cells (SCSubtype)."),
    "Her2E_SC": Signature(
        _HER2E_SC, _SCSUBTYPE.format("Her2E_SC"), "scsubtype",
        "HER2-enriched cancer cells (SCSubtype)."),
    "LumA_SC": Signature(_LUMA_SC, _SCSUBTYPE.format("LumA_SC"), "scsubtype", "Luminal A cancer cells (SCSubtype)."),
    "LumB_SC": Signature(_LUMB_SC, _SCSUBTYPE.format("LumB_SC"), "scsubtype", "Luminal B cancer cells (SCSubtype)."),
}


def library() -> dict[str, list[str]]:
    """Signature name → genes."""
    return {name: list(sig.genes) for name, sig in SIGNATURES.items()}


def source(name: str) -> str:
    return signature(name).source


def lookup(name: str) -> str | None:
    """The library's spelling of ``name`` (matched ignoring case), or None."""
    by_lower = {n.lower(): n for n in SIGNATURES}
    return by_lower.get((name or "").strip().lower())


def signature(name: str) -> Signature:
    """A library set by name (ignoring case); an unknown name is an error that lists the library."""
    found = lookup(name)
    if found is None:
        raise TesseraError(f"No signature {name!r} in the library; known: {', '.join(SIGNATURES)}.")
    return SIGNATURES[found]


def available(panel: list[str]) -> list[str]:
    """Library names with at least one gene in ``panel`` (matched ignoring case)."""
    upper = {g.upper() for g in panel}
    return [n for n, sig in SIGNATURES.items() if any(g.upper() in upper for g in sig.genes)]


@dataclass(frozen=True)
class Resolved:
    """A signature matched to a model's panel. ``name``: the library name, or the typed genes
    joined by commas; ``genes_used``: in the panel's spelling, in the signature's order;
    ``genes_missing``: library genes that the panel lacks (typed genes are never missing: an
    unknown typed gene is an error); ``source``: the citation, or ``typed gene list``."""

    name: str
    genes_used: tuple[str, ...]
    genes_missing: tuple[str, ...]
    source: str
    category: str | None = None      # None for a typed list

    @property
    def is_library(self) -> bool:
        return self.category is not None

    @property
    def notice(self) -> str | None:
        """What the score leaves out, naming every missing gene (None when nothing is)."""
        if not self.genes_missing:
            return None
        n = len(self.genes_used) + len(self.genes_missing)
        text = (f"{len(self.genes_missing)} of the {n} genes of {self.name} are not in the model's panel and are left "
                f"out: {', '.join(self.genes_missing)}.")
        if len(self.genes_used) * 2 < n:
            text += f" The score rests on the {len(self.genes_used)} that remain: {', '.join(self.genes_used)}."
        return text


MIN_GENES = 1   # a single remaining gene still gives a score (bin-matched background for score_genes)


def resolve(spec: str, panel: list[str]) -> Resolved:
    """A library name (ignoring case) or typed genes (separated by commas, spaces or semicolons)
    matched to ``panel`` ignoring case. Library genes that the panel lacks are named in
    :attr:`Resolved.notice`; a library set with none in the panel, an empty spec and an unknown
    typed gene are errors that name what was wrong."""
    text = (spec or "").strip()
    if not text:
        raise TesseraError("Name a signature: a library name (e.g. LumA_SC, pam50_proliferation) or genes "
                           "separated by commas (e.g. CD8A, CD3E, GZMB).")
    by_upper = {g.upper(): g for g in panel}
    name = lookup(text)
    if name is not None:
        sig = SIGNATURES[name]
        used = tuple(dict.fromkeys(by_upper[g.upper()] for g in sig.genes if g.upper() in by_upper))
        missing = tuple(g for g in sig.genes if g.upper() not in by_upper)
        if len(used) < MIN_GENES:
            raise TesseraError(f"None of the {len(sig.genes)} genes of {name} is in the model's panel of "
                               f"{len(panel)} genes (the set has {', '.join(sig.genes[:8])}…).")
        return Resolved(name, used, missing, sig.source, sig.category)
    wanted = [t for t in re.split(r"[\s,;]+", text) if t]
    unknown = [t for t in wanted if t.upper() not in by_upper]
    if unknown:
        if len(wanted) == 1:
            raise TesseraError(f"{text!r} is neither a library signature nor a gene of the model's panel. Library: "
                               f"{', '.join(SIGNATURES)}; panel genes include {', '.join(panel[:12])}…")
        raise TesseraError(f"Not in the model's panel of {len(panel)} genes: {', '.join(unknown)}. "
                           f"Panel genes include {', '.join(panel[:12])}…")
    used = tuple(dict.fromkeys(by_upper[t.upper()] for t in wanted))
    return Resolved(",".join(used), used, (), "typed gene list")
