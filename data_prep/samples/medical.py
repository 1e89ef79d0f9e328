"""A medical question/answer set in Alpaca format, written by the project itself.

The demo and the tests need instruction data without a network. This module writes
about 240 varied rows (instruction / input / output) from a small table of common
conditions: what a condition is, its symptoms, causes, treatment, prevention, when to
see a doctor, and short patient cases (with an `input`) that ask which condition
fits. General health information for a demo, not medical advice.

Like nanoGPT's ``prepare.py``, it records what it wrote: a sidecar
``<file>.meta.json`` holds the row count and a content hash.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Condition:
    name: str
    what: str
    symptoms: tuple[str, ...]
    causes: tuple[str, ...]
    treatment: tuple[str, ...]
    prevention: tuple[str, ...]
    see_doctor: tuple[str, ...]


CONDITIONS: tuple[Condition, ...] = (
    Condition("influenza", "a contagious respiratory infection caused by influenza viruses",
              ("sudden fever", "muscle aches", "dry cough", "fatigue", "headache"),
              ("influenza A or B viruses spread by respiratory droplets",),
              ("rest", "fluids", "antiviral medicines such as oseltamivir when started early"),
              ("a yearly flu vaccine", "hand washing", "staying home when sick"),
              ("difficulty breathing", "chest pain", "symptoms that improve and then return worse")),
    Condition("the common cold", "a mild viral infection of the nose and throat",
              ("runny nose", "sneezing", "sore throat", "mild cough"),
              ("rhinoviruses and other respiratory viruses",),
              ("rest", "fluids", "saline nasal spray", "simple pain relievers"),
              ("hand washing", "not touching the face", "avoiding close contact with sick people"),
              ("a fever above 39 C", "symptoms lasting more than ten days", "ear pain")),
    Condition("type 2 diabetes", "a long-term condition in which the body does not use insulin well, so blood sugar stays high",
              ("increased thirst", "frequent urination", "tiredness", "blurred vision", "slow-healing sores"),
              ("insulin resistance", "excess body weight", "physical inactivity", "family history"),
              ("a balanced diet", "regular exercise", "metformin", "other glucose-lowering medicines when needed"),
              ("keeping a healthy weight", "regular physical activity", "limiting sugary drinks"),
              ("very high blood sugar readings", "confusion", "signs of infection in a foot wound")),
    Condition("hypertension", "persistently high blood pressure in the arteries",
              ("usually no symptoms", "headaches in severe cases", "nosebleeds in severe cases"),
              ("genetics", "a salty diet", "excess weight", "too much alcohol", "lack of exercise"),
              ("less salt", "regular exercise", "ACE inhibitors", "diuretics", "calcium channel blockers"),
              ("limiting salt", "exercising regularly", "moderating alcohol", "not smoking"),
              ("readings above 180/120", "chest pain", "sudden severe headache", "vision changes")),
    Condition("asthma", "a chronic condition in which the airways narrow and swell",
              ("wheezing", "shortness of breath", "chest tightness", "coughing at night"),
              ("allergens", "respiratory infections", "cold air", "exercise", "smoke"),
              ("inhaled corticosteroids", "quick-relief inhalers such as salbutamol", "an asthma action plan"),
              ("avoiding known triggers", "taking controller medicine every day", "a yearly flu vaccine"),
              ("a rescue inhaler that does not help", "blue lips", "trouble speaking in full sentences")),
    Condition("migraine", "a neurological condition that causes recurring, often one-sided, throbbing headaches",
              ("throbbing headache", "nausea", "sensitivity to light", "sensitivity to sound", "visual aura"),
              ("genetic factors", "hormonal changes", "lack of sleep", "stress", "certain foods"),
              ("rest in a dark room", "pain relievers", "triptans", "preventive medicines for frequent attacks"),
              ("regular sleep", "regular meals", "a headache diary to find triggers"),
              ("the worst headache of your life", "headache with fever and stiff neck", "weakness on one side")),
    Condition("gastroenteritis", "an inflammation of the stomach and intestines, usually from an infection",
              ("diarrhea", "vomiting", "stomach cramps", "mild fever"),
              ("norovirus", "rotavirus", "bacteria in contaminated food or water"),
              ("oral rehydration solution", "small sips of fluid", "rest", "a bland diet as appetite returns"),
              ("hand washing", "safe food handling", "the rotavirus vaccine for infants"),
              ("signs of dehydration", "blood in the stool", "vomiting for more than two days")),
    Condition("urinary tract infection", "an infection of the bladder or another part of the urinary system",
              ("burning when urinating", "frequent urge to urinate", "cloudy urine", "lower belly pain"),
              ("bacteria such as E. coli entering the urethra",),
              ("antibiotics prescribed by a clinician", "plenty of fluids"),
              ("drinking enough water", "urinating after intercourse", "wiping front to back"),
              ("fever", "back or side pain", "vomiting", "blood in the urine")),
    Condition("iron deficiency anemia", "a shortage of red blood cells caused by too little iron",
              ("tiredness", "pale skin", "shortness of breath on exertion", "brittle nails", "cold hands"),
              ("blood loss", "a diet low in iron", "poor iron absorption", "pregnancy"),
              ("iron supplements", "iron-rich foods", "treating the source of blood loss"),
              ("eating iron-rich foods such as beans, lentils and lean meat", "vitamin C with meals"),
              ("chest pain", "a fast heartbeat", "black or bloody stools")),
    Condition("hypothyroidism", "an underactive thyroid gland that makes too little thyroid hormone",
              ("tiredness", "weight gain", "feeling cold", "dry skin", "constipation"),
              ("Hashimoto's thyroiditis", "thyroid surgery", "iodine deficiency"),
              ("daily levothyroxine", "regular blood tests to adjust the dose"),
              ("adequate iodine in the diet",),
              ("a swelling in the neck", "extreme fatigue", "symptoms during pregnancy")),
    Condition("osteoarthritis", "a wearing down of the cartilage that cushions the ends of bones in joints",
              ("joint pain", "stiffness after rest", "reduced range of motion", "a grating feeling"),
              ("aging", "joint injury", "excess weight", "repetitive stress"),
              ("exercise and physical therapy", "weight loss", "pain relievers", "joint injections"),
              ("keeping a healthy weight", "staying active", "protecting joints from injury"),
              ("a joint that is hot, red and swollen", "pain that stops you from walking")),
    Condition("gout", "a form of arthritis caused by uric acid crystals in a joint",
              ("sudden severe joint pain", "a red swollen big toe", "warmth over the joint"),
              ("high uric acid levels", "red meat", "alcohol", "sugary drinks", "some diuretics"),
              ("anti-inflammatory medicines", "colchicine", "urate-lowering medicines such as allopurinol"),
              ("limiting alcohol and red meat", "drinking water", "keeping a healthy weight"),
              ("fever with a hot joint", "attacks that keep coming back")),
    Condition("eczema", "a condition that makes the skin dry, itchy and inflamed",
              ("itchy skin", "dry patches", "redness", "cracked or scaly skin"),
              ("a weak skin barrier", "genetics", "irritants such as soaps", "allergens"),
              ("daily moisturizers", "topical corticosteroids", "avoiding irritants"),
              ("moisturizing after bathing", "mild fragrance-free soaps", "cotton clothing"),
              ("skin that oozes or crusts", "signs of infection", "itching that disturbs sleep")),
    Condition("psoriasis", "an immune-mediated skin condition that causes thick, scaly plaques",
              ("raised red plaques", "silvery scales", "itching", "nail changes"),
              ("an overactive immune response", "genetics", "triggers such as stress and infections"),
              ("topical steroids", "vitamin D creams", "light therapy", "biologic medicines"),
              ("managing stress", "not smoking", "limiting alcohol"),
              ("joint pain and swelling", "plaques covering large areas of skin")),
    Condition("acne", "a skin condition in which hair follicles clog with oil and dead skin cells",
              ("whiteheads", "blackheads", "pimples", "cysts"),
              ("excess oil production", "clogged pores", "bacteria", "hormonal changes"),
              ("benzoyl peroxide", "topical retinoids", "antibiotics for inflamed acne"),
              ("gentle cleansing twice a day", "non-comedogenic products", "not squeezing spots"),
              ("deep painful cysts", "scarring", "acne that does not improve with over-the-counter care")),
    Condition("allergic rhinitis", "an allergic reaction that inflames the inside of the nose",
              ("sneezing", "itchy nose", "runny nose", "watery eyes"),
              ("pollen", "dust mites", "pet dander", "mold"),
              ("antihistamines", "nasal corticosteroid sprays", "allergen immunotherapy"),
              ("keeping windows closed in pollen season", "washing bedding in hot water"),
              ("wheezing", "symptoms that disrupt sleep or work")),
    Condition("sinusitis", "inflammation of the sinuses, often after a cold",
              ("facial pain or pressure", "blocked nose", "thick nasal discharge", "reduced sense of smell"),
              ("viral infections", "bacterial infections", "allergies", "nasal polyps"),
              ("saline rinses", "decongestants for a few days", "antibiotics only for bacterial cases"),
              ("treating allergies", "hand washing", "not smoking"),
              ("swelling around the eyes", "a high fever", "symptoms lasting more than ten days")),
    Condition("strep throat", "a bacterial infection of the throat and tonsils",
              ("sudden sore throat", "pain when swallowing", "fever", "red swollen tonsils"),
              ("group A Streptococcus bacteria",),
              ("antibiotics such as penicillin or amoxicillin", "pain relievers", "fluids"),
              ("hand washing", "not sharing cups or utensils"),
              ("difficulty breathing", "a rash", "symptoms that do not improve after two days of antibiotics")),
    Condition("pneumonia", "an infection that inflames the air sacs in one or both lungs",
              ("cough with phlegm", "fever", "chills", "shortness of breath", "chest pain when breathing"),
              ("bacteria such as Streptococcus pneumoniae", "viruses", "fungi"),
              ("antibiotics for bacterial pneumonia", "rest", "fluids", "oxygen in severe cases"),
              ("pneumococcal and flu vaccines", "not smoking", "hand washing"),
              ("difficulty breathing", "bluish lips", "confusion", "a high persistent fever")),
    Condition("bronchitis", "inflammation of the lining of the bronchial tubes",
              ("cough", "mucus", "tiredness", "slight fever", "chest discomfort"),
              ("viruses", "cigarette smoke", "air pollution"),
              ("rest", "fluids", "humidified air", "avoiding smoke"),
              ("not smoking", "a yearly flu vaccine", "hand washing"),
              ("a cough lasting more than three weeks", "blood in the mucus", "wheezing")),
    Condition("GERD", "gastroesophageal reflux disease, in which stomach acid flows back into the esophagus",
              ("heartburn", "regurgitation", "chest discomfort after meals", "a sour taste"),
              ("a weak lower esophageal sphincter", "obesity", "large meals", "lying down after eating"),
              ("smaller meals", "raising the head of the bed", "antacids", "proton pump inhibitors"),
              ("not eating late at night", "limiting fatty food and alcohol", "keeping a healthy weight"),
              ("trouble swallowing", "vomiting blood", "unexplained weight loss")),
    Condition("irritable bowel syndrome", "a disorder of the gut-brain interaction that affects the large intestine",
              ("abdominal pain", "bloating", "diarrhea", "constipation"),
              ("changes in gut motility", "sensitive gut nerves", "stress", "certain foods"),
              ("dietary changes such as a low-FODMAP diet", "fiber", "stress management", "medicines for symptoms"),
              ("regular meals", "enough fiber and water", "managing stress"),
              ("rectal bleeding", "weight loss", "symptoms that wake you at night")),
    Condition("kidney stones", "hard deposits of minerals and salts that form inside the kidneys",
              ("severe pain in the side or back", "pain when urinating", "pink or brown urine", "nausea"),
              ("dehydration", "a diet high in salt or protein", "obesity", "some medical conditions"),
              ("plenty of water", "pain relievers", "medicines that relax the ureter", "procedures for large stones"),
              ("drinking enough water", "less salt", "moderate animal protein"),
              ("pain so severe you cannot sit still", "fever and chills", "blood in the urine")),
    Condition("depression", "a mood disorder that causes persistent sadness and loss of interest",
              ("low mood", "loss of interest", "sleep changes", "tiredness", "trouble concentrating"),
              ("a mix of genetic, biological, psychological and social factors",),
              ("talking therapies", "antidepressant medicines", "exercise", "support from family and friends"),
              ("staying connected with others", "regular exercise", "getting help early"),
              ("thoughts of self-harm", "being unable to manage daily life")),
    Condition("generalized anxiety disorder", "a condition of excessive, ongoing worry that is hard to control",
              ("constant worry", "restlessness", "muscle tension", "trouble sleeping", "irritability"),
              ("genetics", "stressful life events", "brain chemistry"),
              ("cognitive behavioral therapy", "medicines such as SSRIs", "relaxation techniques"),
              ("regular exercise", "limiting caffeine", "getting enough sleep"),
              ("panic attacks", "anxiety that stops you from working or studying")),
    Condition("insomnia", "a sleep disorder that makes it hard to fall asleep or stay asleep",
              ("difficulty falling asleep", "waking during the night", "waking too early", "daytime tiredness"),
              ("stress", "irregular schedules", "caffeine", "screens before bed"),
              ("cognitive behavioral therapy for insomnia", "a regular sleep schedule", "short-term medicines"),
              ("a consistent bedtime", "a dark quiet bedroom", "no caffeine late in the day"),
              ("loud snoring with pauses in breathing", "falling asleep while driving")),
    Condition("conjunctivitis", "inflammation of the clear membrane that covers the white of the eye",
              ("red eye", "itching", "a gritty feeling", "discharge"),
              ("viruses", "bacteria", "allergies", "irritants"),
              ("cool compresses", "artificial tears", "antibiotic drops for bacterial cases"),
              ("hand washing", "not sharing towels", "not touching the eyes"),
              ("eye pain", "blurred vision", "sensitivity to light")),
    Condition("otitis media", "an infection of the middle ear, common in children",
              ("ear pain", "fever", "trouble hearing", "irritability in children"),
              ("bacteria or viruses after a cold",),
              ("pain relievers", "watchful waiting", "antibiotics when needed"),
              ("vaccinations", "avoiding smoke exposure", "hand washing"),
              ("a high fever", "fluid draining from the ear", "swelling behind the ear")),
    Condition("shingles", "a painful rash caused by reactivation of the chickenpox virus",
              ("burning pain", "a blistering rash on one side of the body", "itching", "fever"),
              ("reactivation of the varicella-zoster virus",),
              ("antiviral medicines started early", "pain relievers", "cool compresses"),
              ("the shingles vaccine for adults over 50",),
              ("a rash near the eye", "a weakened immune system", "severe pain")),
    Condition("chickenpox", "a highly contagious viral infection that causes an itchy blister-like rash",
              ("itchy spots that turn into blisters", "fever", "tiredness", "loss of appetite"),
              ("the varicella-zoster virus",),
              ("calamine lotion", "cool baths", "fever reducers other than aspirin in children"),
              ("the varicella vaccine",),
              ("difficulty breathing", "a rash that becomes very red or warm", "drowsiness")),
    Condition("celiac disease", "an immune reaction to eating gluten that damages the small intestine",
              ("diarrhea", "bloating", "weight loss", "tiredness", "anemia"),
              ("an immune reaction to gluten in people with certain genes",),
              ("a strict lifelong gluten-free diet",),
              ("no known prevention; early diagnosis limits damage",),
              ("ongoing digestive symptoms", "unexplained anemia", "a family member with celiac disease")),
    Condition("osteoporosis", "a condition in which bones become weak and brittle",
              ("often no symptoms until a fracture", "back pain", "loss of height", "a stooped posture"),
              ("aging", "low estrogen after menopause", "low calcium and vitamin D", "inactivity"),
              ("calcium and vitamin D", "weight-bearing exercise", "medicines such as bisphosphonates"),
              ("weight-bearing exercise", "enough calcium and vitamin D", "not smoking"),
              ("a fracture after a minor fall", "sudden back pain")),
    Condition("heart failure", "a condition in which the heart does not pump blood as well as it should",
              ("shortness of breath", "swollen ankles", "tiredness", "needing extra pillows to sleep"),
              ("coronary artery disease", "high blood pressure", "heart valve disease"),
              ("medicines such as ACE inhibitors and beta blockers", "diuretics", "less salt", "monitoring weight"),
              ("controlling blood pressure", "not smoking", "regular exercise"),
              ("sudden weight gain", "breathlessness at rest", "chest pain", "fainting")),
    Condition("dehydration", "a state in which the body loses more fluid than it takes in",
              ("thirst", "dark urine", "dizziness", "dry mouth", "tiredness"),
              ("not drinking enough", "vomiting", "diarrhea", "heavy sweating"),
              ("drinking water", "oral rehydration solution", "intravenous fluids in severe cases"),
              ("drinking regularly", "extra fluids in hot weather or exercise"),
              ("confusion", "no urine for eight hours", "a very fast heartbeat")),
    Condition("heat exhaustion", "a heat-related illness from losing water and salt in hot conditions",
              ("heavy sweating", "weakness", "dizziness", "nausea", "headache"),
              ("high temperatures", "strenuous activity", "not drinking enough"),
              ("moving to a cool place", "drinking water", "loosening clothing", "cool cloths on the skin"),
              ("avoiding the midday heat", "drinking fluids", "light clothing"),
              ("a temperature above 40 C", "confusion", "symptoms that last more than an hour")),
)

_WHAT = ("What is {c}?", "Explain what {c} is.", "Give a short definition of {c}.", "Can you tell me what {c} means?")
_SYMPTOMS = ("What are the symptoms of {c}?", "List the common symptoms of {c}.",
             "How does {c} usually show itself?", "Which signs suggest {c}?")
_CAUSES = ("What causes {c}?", "Why do people get {c}?", "What are the main causes of {c}?")
_TREAT = ("How is {c} treated?", "What is the treatment for {c}?", "How do doctors manage {c}?")
_PREVENT = ("How can {c} be prevented?", "What lowers the risk of {c}?", "How can I avoid {c}?")
_DOCTOR = ("When should someone with {c} see a doctor?", "What are the warning signs with {c}?",
           "When is {c} an emergency?")
_CASE = ("Which condition best fits this patient's symptoms?", "Suggest the most likely diagnosis.",
         "What condition could explain this presentation?")


def _join(items: tuple[str, ...], last: str = "and") -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + f" {last} " + items[-1]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def generate_rows(seed: int = 0) -> list[dict[str, str]]:
    """All rows, in a fixed order (deterministic for a seed)."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    for cond in CONDITIONS:
        c = cond.name
        rows.append({"instruction": rng.choice(_WHAT).format(c=c), "input": "",
                     "output": f"{_cap(c)} is {cond.what}."})
        rows.append({"instruction": rng.choice(_SYMPTOMS).format(c=c), "input": "",
                     "output": f"Common symptoms of {c}: {_join(cond.symptoms)}."})
        rows.append({"instruction": rng.choice(_CAUSES).format(c=c), "input": "",
                     "output": f"{_cap(c)} is usually caused by {_join(cond.causes)}."})
        rows.append({"instruction": rng.choice(_TREAT).format(c=c), "input": "",
                     "output": f"Treatment of {c} may include {_join(cond.treatment)}. "
                               "A clinician can advise what suits a given patient."})
        rows.append({"instruction": rng.choice(_PREVENT).format(c=c), "input": "",
                     "output": f"The risk of {c} can be lowered by {_join(cond.prevention)}."})
        rows.append({"instruction": rng.choice(_DOCTOR).format(c=c), "input": "",
                     "output": f"With {c}, seek medical care promptly for {_join(cond.see_doctor, 'or')}."})
        picked = rng.sample(cond.symptoms, k=min(3, len(cond.symptoms)))
        age = rng.randint(6, 80)
        rows.append({"instruction": rng.choice(_CASE),
                     "input": f"A {age}-year-old patient reports {_join(tuple(picked))}.",
                     "output": f"These symptoms are consistent with {c}, which is {cond.what}. "
                               "A clinical examination is needed to confirm it."})
    return rows


def _write_jsonl(path: Path, rows: list[dict], fmt: str, generator: str, seed: int) -> Path:
    """Write `rows` as JSON Lines at `path` (atomically) with a `.meta.json` record beside it."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    meta = {"rows": len(rows), "format": fmt, "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "generator": generator, "seed": seed}
    path.with_name(path.name + ".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def write(path: Path, seed: int = 0) -> Path:
    """Write the set as JSON Lines at `path` (atomically) with a `.meta.json` record beside it."""
    return _write_jsonl(path, generate_rows(seed), "alpaca", "data_prep.samples.medical", seed)


_UNHELPFUL = ("I cannot help with medical questions.", "Please ask someone else.", "That is not something I know "
              "about.", "I would rather not say.", "Look it up yourself.", "No idea, sorry.",
              "You should not worry about that.", "Ask me something else.")


def preference_rows(seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs on the same questions: ``prompt`` / ``chosen`` / ``rejected`` strings. The chosen answer
    is the set's own; the rejected one declines or brushes the question off (unhelpful, 85%) or answers the same
    question about another condition (fluent but wrong, 15%), so a preference-tuned model has something to learn
    to prefer."""
    rng = random.Random(seed + 1)
    rows = generate_rows(seed)
    per_condition = len(rows) // len(CONDITIONS)
    pairs = []
    for i, row in enumerate(rows):
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        if rng.random() < 0.15:
            other = rng.choice([j for j in range(len(CONDITIONS)) if j != i // per_condition])
            wrong = rows[other * per_condition + i % per_condition]["output"]
        else:
            wrong = rng.choice(_UNHELPFUL)
        pairs.append({"prompt": prompt, "chosen": row["output"], "rejected": wrong})
    return pairs


def write_pairs(path: Path, seed: int = 0) -> Path:
    """Write :func:`preference_rows` as JSON Lines at `path` (atomically), with a `.meta.json` beside it."""
    return _write_jsonl(path, preference_rows(seed), "preference", "data_prep.samples.medical.preference_rows", seed)


def encyclopedia() -> list[str]:
    """Short prose entries on the same conditions, in another phrasing than the Q&A rows.

    The tiny demo model is pretrained on these (finetune/models/tiny.py), the way a real base
    model has read about medicine before anyone fine-tunes it to answer questions.
    """
    docs = []
    for cond in CONDITIONS:
        c = cond.name
        docs.append(
            f"{_cap(c)} is {cond.what}. Typical signs are {_join(cond.symptoms)}. "
            f"It is usually caused by {_join(cond.causes)}. Care may include {_join(cond.treatment)}. "
            f"The risk falls with {_join(cond.prevention)}. Urgent care is needed for "
            f"{_join(cond.see_doctor, 'or')}."
        )
    return docs


def multiple_choice_rows(seed: int = 0) -> list[dict]:
    """Four-way multiple-choice questions (which condition fits a description), one per condition:
    the data of the built-in lm-eval-harness task `finetune_medical_mc` (finetune/evaluate/harness.py)."""
    rng = random.Random(seed)
    rows = []
    for cond in CONDITIONS:
        others = rng.sample([o.name for o in CONDITIONS if o.name != cond.name], 3)
        choices = others + [cond.name]
        rng.shuffle(choices)
        rows.append({"question": f"Which condition is {cond.what}?", "choices": choices,
                     "answer": choices.index(cond.name)})
    return rows
