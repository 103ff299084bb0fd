/*
 * faulthsm: a PKCS#11 module that forwards every call to a real one (SoftHSM2 by default)
 * and, on command, makes signatures slow, makes calls fail, hides mechanisms, or refuses
 * attributes it does not know.
 * Written for hsm-proxy's tests and benchmark; not for production.
 *
 * Build:  gcc -shared -fPIC -O2 -o libfaulthsm.so faulthsm.c -ldl
 *         (or: python -m tests.faulthsm BUILD_DIR, which prints the path of the .so)
 *
 * Configuration: environment variables (read once, at C_GetFunctionList) give the static
 * settings; a control file, when FAULTHSM_CONTROL names one, is read again on every
 * intercepted call and overrides them while it exists (delete it to go back to the
 * environment's settings). Control file syntax: one KEY=VALUE per line, '#' comments.
 *
 *   env variable           control key   meaning
 *   FAULTHSM_MODULE        -             the real module (default /usr/lib/softhsm/libsofthsm2.so)
 *   FAULTHSM_CONTROL       -             path of the control file (optional)
 *   FAULTHSM_DELAY_MS      delay_ms      added to every C_Sign that produces a signature
 *                                         (not to python-pkcs11's size query), milliseconds,
 *                                         may be fractional: 0.5
 *   FAULTHSM_JITTER_MS     jitter_ms     plus a uniformly random 0..jitter_ms
 *   FAULTHSM_ERROR         error         a CKR_ code (name such as CKR_DEVICE_ERROR, or hex
 *                                         0x30) returned instead of calling the real module
 *   -                      error_count   only the first N affected calls fail, counted from
 *                                         when the control file was last replaced (a new
 *                                         inode, as `mv new control` makes): one-shot faults
 *   FAULTHSM_ERROR_CALLS   error_calls   which calls fail: "sign" (C_SignInit and C_Sign,
 *                                         the default) or "all" (also C_Initialize,
 *                                         C_GetSlotList, C_GetTokenInfo, C_OpenSession,
 *                                         C_Login, C_FindObjectsInit, C_GetAttributeValue)
 *   FAULTHSM_HIDE          hide          comma-separated mechanisms (CKM_RSA_X_509 or 0x3)
 *                                         left out of C_GetMechanismList and refused by
 *                                         C_GetMechanismInfo and C_SignInit
 *                                         (CKR_MECHANISM_INVALID)
 *   FAULTHSM_MAX_SESSIONS  max_sessions  the session limit C_GetTokenInfo reports
 *                                         (ulMaxSessionCount; 0 leaves the real value)
 *   FAULTHSM_REFUSE_ATTRIBUTES refuse_attributes  comma-separated attribute types
 *                                         (CKA_SIGN_RECOVER or 0x109) the token does not
 *                                         know, as AWS CloudHSM's SDK 5 library knows no
 *                                         sign-recover: a C_GenerateKeyPair template naming
 *                                         one and a C_GetAttributeValue asking for one get
 *                                         CKR_ATTRIBUTE_TYPE_INVALID
 *   -                      hold          1: every C_Sign that produces a signature waits
 *                                         (re-reading the control file every 5 ms) until
 *                                         hold is no longer set: a test sees signatures
 *                                         under way, by the stats file, and lets them go
 *   FAULTHSM_STATS         -             a file rewritten when a signature starts and
 *                                         after it ends with "signatures=N" (signatures
 *                                         made by this process), "in_flight=K" (C_Sign
 *                                         calls under way now) and "max_in_flight=M" (most
 *                                         C_Sign calls that were under way at once)
 *
 * Known names: CKR_DEVICE_ERROR, CKR_DEVICE_REMOVED, CKR_DEVICE_MEMORY, CKR_GENERAL_ERROR,
 * CKR_FUNCTION_FAILED, CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED,
 * CKR_USER_NOT_LOGGED_IN, CKR_TOKEN_NOT_PRESENT, CKR_CRYPTOKI_NOT_INITIALIZED;
 * CKM_RSA_PKCS, CKM_RSA_X_509, CKM_RSA_PKCS_PSS, CKM_ECDSA; CKA_SIGN_RECOVER,
 * CKA_VERIFY_RECOVER.
 *
 * Example: export FAULTHSM_CONTROL=/tmp/fault; echo error=CKR_DEVICE_ERROR > /tmp/fault
 * makes every signature fail until `rm /tmp/fault`.
 *
 * Only the few PKCS#11 declarations needed are written here (from the PKCS#11 v2.40
 * specification); the function list is forwarded slot by slot, in the standard order.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <unistd.h>

typedef unsigned long CK_ULONG, CK_RV, CK_SLOT_ID, CK_SESSION_HANDLE, CK_OBJECT_HANDLE,
    CK_MECHANISM_TYPE, CK_FLAGS, CK_USER_TYPE;
typedef unsigned char CK_BYTE, CK_BBOOL;
typedef struct { CK_BYTE major, minor; } CK_VERSION;
typedef struct { CK_MECHANISM_TYPE mechanism; void *pParameter; CK_ULONG ulParameterLen; } CK_MECHANISM;
typedef struct { unsigned long type; void *pValue; CK_ULONG ulValueLen; } CK_ATTRIBUTE;

#define CKR_OK 0x0UL
#define CKR_BUFFER_TOO_SMALL 0x150UL
#define CKR_MECHANISM_INVALID 0x70UL
#define CKR_GENERAL_ERROR 0x5UL
#define CKR_ATTRIBUTE_TYPE_INVALID 0x12UL
#define CK_UNAVAILABLE_INFORMATION (~0UL)

/* The 68 functions of CK_FUNCTION_LIST (v2.x), in their standard order. */
enum {
    F_Initialize, F_Finalize, F_GetInfo, F_GetFunctionList, F_GetSlotList, F_GetSlotInfo,
    F_GetTokenInfo, F_GetMechanismList, F_GetMechanismInfo, F_InitToken, F_InitPIN, F_SetPIN,
    F_OpenSession, F_CloseSession, F_CloseAllSessions, F_GetSessionInfo, F_GetOperationState,
    F_SetOperationState, F_Login, F_Logout, F_CreateObject, F_CopyObject, F_DestroyObject,
    F_GetObjectSize, F_GetAttributeValue, F_SetAttributeValue, F_FindObjectsInit,
    F_FindObjects, F_FindObjectsFinal, F_EncryptInit, F_Encrypt, F_EncryptUpdate,
    F_EncryptFinal, F_DecryptInit, F_Decrypt, F_DecryptUpdate, F_DecryptFinal, F_DigestInit,
    F_Digest, F_DigestUpdate, F_DigestKey, F_DigestFinal, F_SignInit, F_Sign, F_SignUpdate,
    F_SignFinal, F_SignRecoverInit, F_SignRecover, F_VerifyInit, F_Verify, F_VerifyUpdate,
    F_VerifyFinal, F_VerifyRecoverInit, F_VerifyRecover, F_DigestEncryptUpdate,
    F_DecryptDigestUpdate, F_SignEncryptUpdate, F_DecryptVerifyUpdate, F_GenerateKey,
    F_GenerateKeyPair, F_WrapKey, F_UnwrapKey, F_DeriveKey, F_SeedRandom, F_GenerateRandom,
    F_GetFunctionStatus, F_CancelFunction, F_WaitForSlotEvent, F_COUNT
};

typedef struct {
    CK_VERSION version;
    void *f[F_COUNT];
} FUNCTION_LIST;

typedef CK_RV (*get_function_list_fn)(FUNCTION_LIST **);

static FUNCTION_LIST *real;
static FUNCTION_LIST ours;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static CK_RV load_result = CKR_OK;

#define MAX_HIDDEN 16
typedef struct {
    double delay_ms, jitter_ms;
    CK_RV error;          /* CKR_OK: no fault */
    int error_all;        /* 1: every intercepted call fails, 0: signing only */
    long error_count;     /* > 0: only that many calls fail per version of the file */
    unsigned long max_sessions; /* > 0: reported as the token's ulMaxSessionCount */
    CK_MECHANISM_TYPE hidden[MAX_HIDDEN];
    int hidden_count;
    unsigned long refused[MAX_HIDDEN]; /* attribute types the token does not know */
    int refused_count;
    int hold;             /* 1: signatures wait until the control file says otherwise */
} settings_t;

static settings_t env_settings;
static const char *control_path;
static const char *stats_path;
static pthread_mutex_t stats_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long in_flight, max_in_flight, signatures;

static void write_stats(void) { /* with stats_lock held */
    if (stats_path) {
        char partial[4096];
        snprintf(partial, sizeof partial, "%s.%d.tmp", stats_path, (int)getpid());
        FILE *file = fopen(partial, "w");
        if (file) {
            fprintf(file, "signatures=%lu\nin_flight=%lu\nmax_in_flight=%lu\n", signatures,
                    in_flight, max_in_flight);
            fclose(file);
            rename(partial, stats_path);
        }
    }
}

static void sign_started(void) {
    pthread_mutex_lock(&stats_lock);
    if (++in_flight > max_in_flight) max_in_flight = in_flight;
    write_stats();
    pthread_mutex_unlock(&stats_lock);
}

static void sign_finished(CK_RV rv) {
    pthread_mutex_lock(&stats_lock);
    in_flight--;
    if (rv == CKR_OK) signatures++;
    write_stats();
    pthread_mutex_unlock(&stats_lock);
}

static const struct { const char *name; unsigned long value; } names[] = {
    {"CKR_DEVICE_ERROR", 0x30}, {"CKR_DEVICE_MEMORY", 0x31}, {"CKR_DEVICE_REMOVED", 0x32},
    {"CKR_GENERAL_ERROR", 0x5}, {"CKR_FUNCTION_FAILED", 0x6},
    {"CKR_SESSION_HANDLE_INVALID", 0xB3}, {"CKR_SESSION_CLOSED", 0xB0},
    {"CKR_USER_NOT_LOGGED_IN", 0x101}, {"CKR_TOKEN_NOT_PRESENT", 0xE0},
    {"CKR_CRYPTOKI_NOT_INITIALIZED", 0x190}, {"CKM_RSA_PKCS", 0x1}, {"CKM_RSA_X_509", 0x3},
    {"CKM_RSA_PKCS_PSS", 0xD}, {"CKM_ECDSA", 0x1041}, {"CKA_SIGN_RECOVER", 0x109},
    {"CKA_VERIFY_RECOVER", 0x10B},
};

static int parse_code(const char *text, unsigned long *out) {
    char *end;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (strcmp(text, names[i].name) == 0) { *out = names[i].value; return 1; }
    }
    errno = 0;
    unsigned long value = strtoul(text, &end, 0);
    if (errno || end == text || *end) {
        fprintf(stderr, "faulthsm: cannot parse %s as a CKR_/CKM_ name or number\n", text);
        return 0;
    }
    *out = value;
    return 1;
}

static char *trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    char *end = s + strlen(s);
    while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n' || end[-1] == '\r'))
        *--end = 0;
    return s;
}

static void apply(settings_t *s, const char *key, char *value) {
    value = trim(value);
    if (strcmp(key, "delay_ms") == 0) s->delay_ms = atof(value);
    else if (strcmp(key, "jitter_ms") == 0) s->jitter_ms = atof(value);
    else if (strcmp(key, "error_count") == 0) s->error_count = atol(value);
    else if (strcmp(key, "max_sessions") == 0) s->max_sessions = strtoul(value, NULL, 0);
    else if (strcmp(key, "hold") == 0) s->hold = atoi(value) != 0;
    else if (strcmp(key, "error") == 0) {
        unsigned long code = CKR_OK;
        s->error = *value && parse_code(value, &code) ? code : CKR_OK;
    } else if (strcmp(key, "error_calls") == 0) s->error_all = strcmp(value, "all") == 0;
    else if (strcmp(key, "hide") == 0) {
        s->hidden_count = 0;
        for (char *item = strtok(value, ","); item && s->hidden_count < MAX_HIDDEN;
             item = strtok(NULL, ",")) {
            unsigned long code;
            if (parse_code(trim(item), &code)) s->hidden[s->hidden_count++] = code;
        }
    } else if (strcmp(key, "refuse_attributes") == 0) {
        s->refused_count = 0;
        for (char *item = strtok(value, ","); item && s->refused_count < MAX_HIDDEN;
             item = strtok(NULL, ",")) {
            unsigned long code;
            if (parse_code(trim(item), &code)) s->refused[s->refused_count++] = code;
        }
    } else fprintf(stderr, "faulthsm: unknown setting %s\n", key);
}

static void apply_env(settings_t *s, const char *variable, const char *key) {
    const char *value = getenv(variable);
    if (value) {
        char copy[512];
        snprintf(copy, sizeof copy, "%s", value);
        apply(s, key, copy);
    }
}

/* The settings in force now: the environment's, overridden by the control file if any. */
static pthread_mutex_t count_lock = PTHREAD_MUTEX_INITIALIZER;
static ino_t counted_inode;
static long failed_so_far;

static settings_t current(void) {
    settings_t s = env_settings;
    if (!control_path) return s;
    FILE *file = fopen(control_path, "r");
    if (!file) return s;
    struct stat info;
    if (fstat(fileno(file), &info) == 0) {
        pthread_mutex_lock(&count_lock);
        if (info.st_ino != counted_inode) { counted_inode = info.st_ino; failed_so_far = 0; }
        pthread_mutex_unlock(&count_lock);
    }
    char line[512];
    while (fgets(line, sizeof line, file)) {
        char *text = trim(line);
        if (!*text || *text == '#') continue;
        char *equals = strchr(text, '=');
        if (!equals) continue;
        *equals = 0;
        apply(&s, trim(text), equals + 1);
    }
    fclose(file);
    return s;
}

static int is_hidden(const settings_t *s, CK_MECHANISM_TYPE mechanism) {
    for (int i = 0; i < s->hidden_count; i++)
        if (s->hidden[i] == mechanism) return 1;
    return 0;
}

static int is_refused(const settings_t *s, unsigned long type) {
    for (int i = 0; i < s->refused_count; i++)
        if (s->refused[i] == type) return 1;
    return 0;
}

static int names_refused(const settings_t *s, const CK_ATTRIBUTE *template, CK_ULONG n) {
    for (CK_ULONG i = 0; template && i < n; i++)
        if (is_refused(s, template[i].type)) return 1;
    return 0;
}

static void sleep_ms(double ms) {
    if (ms <= 0) return;
    struct timespec t = {(time_t)(ms / 1000), (long)((ms - (time_t)(ms / 1000) * 1000) * 1e6)};
    while (nanosleep(&t, &t) == -1 && errno == EINTR) {}
}

/* Whether the configured error applies to this call (error_count permitting). */
static int fails(const settings_t *s) {
    if (s->error == CKR_OK) return 0;
    if (s->error_count <= 0) return 1;
    pthread_mutex_lock(&count_lock);
    int result = failed_so_far < s->error_count;
    if (result) failed_so_far++;
    pthread_mutex_unlock(&count_lock);
    return result;
}

#define REAL(name, type) ((type)real->f[F_##name])
#define FAIL_ALL() do { settings_t s_ = current(); \
    if (s_.error != CKR_OK && s_.error_all && fails(&s_)) return s_.error; } while (0)

static CK_RV w_Initialize(void *args) {
    FAIL_ALL();
    return REAL(Initialize, CK_RV (*)(void *))(args);
}

static CK_RV w_GetSlotList(CK_BBOOL present, CK_SLOT_ID *list, CK_ULONG *count) {
    FAIL_ALL();
    return REAL(GetSlotList, CK_RV (*)(CK_BBOOL, CK_SLOT_ID *, CK_ULONG *))(present, list, count);
}

/* The start of CK_TOKEN_INFO, up to the session limit. */
typedef struct {
    CK_BYTE label[32], manufacturerID[32], model[16], serialNumber[16];
    CK_FLAGS flags;
    CK_ULONG ulMaxSessionCount;
} TOKEN_INFO_HEAD;

static CK_RV w_GetTokenInfo(CK_SLOT_ID slot, void *info) {
    settings_t s = current();
    if (s.error != CKR_OK && s.error_all && fails(&s)) return s.error;
    CK_RV rv = REAL(GetTokenInfo, CK_RV (*)(CK_SLOT_ID, void *))(slot, info);
    if (rv == CKR_OK && info && s.max_sessions > 0)
        ((TOKEN_INFO_HEAD *)info)->ulMaxSessionCount = s.max_sessions;
    return rv;
}

static CK_RV w_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, void *app, void *notify,
                           CK_SESSION_HANDLE *session) {
    FAIL_ALL();
    return REAL(OpenSession, CK_RV (*)(CK_SLOT_ID, CK_FLAGS, void *, void *,
                                       CK_SESSION_HANDLE *))(slot, flags, app, notify, session);
}

static CK_RV w_Login(CK_SESSION_HANDLE session, CK_USER_TYPE user, CK_BYTE *pin, CK_ULONG len) {
    FAIL_ALL();
    return REAL(Login, CK_RV (*)(CK_SESSION_HANDLE, CK_USER_TYPE, CK_BYTE *, CK_ULONG))(
        session, user, pin, len);
}

static CK_RV w_FindObjectsInit(CK_SESSION_HANDLE session, CK_ATTRIBUTE *template, CK_ULONG n) {
    FAIL_ALL();
    return REAL(FindObjectsInit, CK_RV (*)(CK_SESSION_HANDLE, CK_ATTRIBUTE *, CK_ULONG))(
        session, template, n);
}

static CK_RV w_GetAttributeValue(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object,
                                 CK_ATTRIBUTE *template, CK_ULONG n) {
    settings_t s = current();
    if (s.error != CKR_OK && s.error_all && fails(&s)) return s.error;
    CK_RV rv = REAL(GetAttributeValue, CK_RV (*)(CK_SESSION_HANDLE, CK_OBJECT_HANDLE,
                                                 CK_ATTRIBUTE *, CK_ULONG))(session, object,
                                                                            template, n);
    if (!names_refused(&s, template, n)) return rv;
    for (CK_ULONG i = 0; i < n; i++)  /* as a token that does not know them answers */
        if (is_refused(&s, template[i].type)) template[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
    return rv == CKR_OK ? CKR_ATTRIBUTE_TYPE_INVALID : rv;
}

static CK_RV w_GenerateKeyPair(CK_SESSION_HANDLE session, CK_MECHANISM *mechanism,
                               CK_ATTRIBUTE *public_template, CK_ULONG public_count,
                               CK_ATTRIBUTE *private_template, CK_ULONG private_count,
                               CK_OBJECT_HANDLE *public_key, CK_OBJECT_HANDLE *private_key) {
    settings_t s = current();
    if (names_refused(&s, public_template, public_count) ||
        names_refused(&s, private_template, private_count))
        return CKR_ATTRIBUTE_TYPE_INVALID;
    typedef CK_RV (*fn)(CK_SESSION_HANDLE, CK_MECHANISM *, CK_ATTRIBUTE *, CK_ULONG,
                        CK_ATTRIBUTE *, CK_ULONG, CK_OBJECT_HANDLE *, CK_OBJECT_HANDLE *);
    return REAL(GenerateKeyPair, fn)(session, mechanism, public_template, public_count,
                                     private_template, private_count, public_key, private_key);
}

static CK_RV w_GetMechanismList(CK_SLOT_ID slot, CK_MECHANISM_TYPE *list, CK_ULONG *count) {
    settings_t s = current();
    if (s.error != CKR_OK && s.error_all && fails(&s)) return s.error;
    typedef CK_RV (*fn)(CK_SLOT_ID, CK_MECHANISM_TYPE *, CK_ULONG *);
    if (!s.hidden_count) return REAL(GetMechanismList, fn)(slot, list, count);
    CK_ULONG n = 0;
    CK_RV rv = REAL(GetMechanismList, fn)(slot, NULL, &n);
    if (rv != CKR_OK) return rv;
    CK_MECHANISM_TYPE *all = calloc(n ? n : 1, sizeof *all);
    if (!all) return CKR_GENERAL_ERROR;
    rv = REAL(GetMechanismList, fn)(slot, all, &n);
    if (rv != CKR_OK) { free(all); return rv; }
    CK_ULONG kept = 0;
    for (CK_ULONG i = 0; i < n; i++)
        if (!is_hidden(&s, all[i])) all[kept++] = all[i];
    if (list == NULL) rv = CKR_OK;
    else if (*count < kept) rv = CKR_BUFFER_TOO_SMALL;
    else memcpy(list, all, kept * sizeof *all);
    *count = kept;
    free(all);
    return rv;
}

static CK_RV w_GetMechanismInfo(CK_SLOT_ID slot, CK_MECHANISM_TYPE type, void *info) {
    settings_t s = current();
    if (s.error != CKR_OK && s.error_all && fails(&s)) return s.error;
    if (is_hidden(&s, type)) return CKR_MECHANISM_INVALID;
    return REAL(GetMechanismInfo, CK_RV (*)(CK_SLOT_ID, CK_MECHANISM_TYPE, void *))(slot, type,
                                                                                   info);
}

static CK_RV w_SignInit(CK_SESSION_HANDLE session, CK_MECHANISM *mechanism,
                        CK_OBJECT_HANDLE key) {
    settings_t s = current();
    if (fails(&s)) return s.error;
    if (mechanism && is_hidden(&s, mechanism->mechanism)) return CKR_MECHANISM_INVALID;
    return REAL(SignInit, CK_RV (*)(CK_SESSION_HANDLE, CK_MECHANISM *, CK_OBJECT_HANDLE))(
        session, mechanism, key);
}

static __thread unsigned int seed;

static CK_RV w_Sign(CK_SESSION_HANDLE session, CK_BYTE *data, CK_ULONG data_len,
                    CK_BYTE *signature, CK_ULONG *signature_len) {
    settings_t s = current();
    typedef CK_RV (*fn)(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *);
    if (s.error != CKR_OK && s.error_count <= 0) return s.error;  /* one-shots hit SignInit */
    if (signature == NULL)  /* a size query, not a signature */
        return REAL(Sign, fn)(session, data, data_len, signature, signature_len);
    sign_started();
    double extra = 0;
    if (s.jitter_ms > 0) {
        if (!seed) seed = (unsigned int)time(NULL) ^ (unsigned int)(size_t)&seed;
        extra = s.jitter_ms * ((double)rand_r(&seed) / RAND_MAX);
    }
    sleep_ms(s.delay_ms + extra);
    while (s.hold) {
        sleep_ms(5);
        s = current();
    }
    CK_RV rv = REAL(Sign, fn)(session, data, data_len, signature, signature_len);
    sign_finished(rv);
    return rv;
}

static CK_RV w_GetFunctionList(FUNCTION_LIST **list);

static void load(void) {
    const char *path = getenv("FAULTHSM_MODULE");
    if (!path || !*path) path = "/usr/lib/softhsm/libsofthsm2.so";
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        fprintf(stderr, "faulthsm: cannot load %s: %s\n", path, dlerror());
        load_result = CKR_GENERAL_ERROR;
        return;
    }
    get_function_list_fn get = (get_function_list_fn)dlsym(handle, "C_GetFunctionList");
    if (!get || get(&real) != CKR_OK || !real) {
        fprintf(stderr, "faulthsm: %s has no usable C_GetFunctionList\n", path);
        load_result = CKR_GENERAL_ERROR;
        return;
    }
    ours = *real;
    ours.f[F_Initialize] = (void *)w_Initialize;
    ours.f[F_GetFunctionList] = (void *)w_GetFunctionList;
    ours.f[F_GetSlotList] = (void *)w_GetSlotList;
    ours.f[F_GetTokenInfo] = (void *)w_GetTokenInfo;
    ours.f[F_GetMechanismList] = (void *)w_GetMechanismList;
    ours.f[F_GetMechanismInfo] = (void *)w_GetMechanismInfo;
    ours.f[F_OpenSession] = (void *)w_OpenSession;
    ours.f[F_Login] = (void *)w_Login;
    ours.f[F_FindObjectsInit] = (void *)w_FindObjectsInit;
    ours.f[F_GetAttributeValue] = (void *)w_GetAttributeValue;
    ours.f[F_SignInit] = (void *)w_SignInit;
    ours.f[F_Sign] = (void *)w_Sign;
    ours.f[F_GenerateKeyPair] = (void *)w_GenerateKeyPair;

    apply_env(&env_settings, "FAULTHSM_DELAY_MS", "delay_ms");
    apply_env(&env_settings, "FAULTHSM_JITTER_MS", "jitter_ms");
    apply_env(&env_settings, "FAULTHSM_ERROR", "error");
    apply_env(&env_settings, "FAULTHSM_ERROR_CALLS", "error_calls");
    apply_env(&env_settings, "FAULTHSM_HIDE", "hide");
    apply_env(&env_settings, "FAULTHSM_MAX_SESSIONS", "max_sessions");
    apply_env(&env_settings, "FAULTHSM_REFUSE_ATTRIBUTES", "refuse_attributes");
    const char *control = getenv("FAULTHSM_CONTROL");
    if (control && *control) control_path = strdup(control);
    const char *stats = getenv("FAULTHSM_STATS");
    if (stats && *stats) stats_path = strdup(stats);
}

static CK_RV w_GetFunctionList(FUNCTION_LIST **list) {
    pthread_once(&once, load);
    if (load_result != CKR_OK) return load_result;
    if (!list) return 0x7UL; /* CKR_ARGUMENTS_BAD */
    *list = &ours;
    return CKR_OK;
}

__attribute__((visibility("default"))) CK_RV C_GetFunctionList(FUNCTION_LIST **list) {
    return w_GetFunctionList(list);
}
